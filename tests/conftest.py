"""Shared fixtures: an isolated cache root and a tiny soundfont dataset rendered once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def pgesam_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes under a throwaway PGESAM_HOME, never into the user's cache."""
    home = tmp_path_factory.mktemp("pgesam_home")
    old = os.environ.get("PGESAM_HOME")
    os.environ["PGESAM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("PGESAM_HOME", None)
    else:
        os.environ["PGESAM_HOME"] = old


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` data preset rendered from a real soundfont: 2 families x 3 instruments x 3 pitches."""
    from pgesam_train.config import data_preset
    from pgesam_train.data.build import build_dataset
    out = tmp_path_factory.mktemp("data") / "tiny"
    build_dataset(data_preset("tiny"), out, preset_name="tiny", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> None:
    """One intra-op torch thread for a test module (use: pytestmark = pytest.mark.usefixtures(...))."""
    from torch_threads import one_thread
    with one_thread():
        yield
