"""Long checks, deselected by default: run with `python -m pytest -m slow` (minutes on 2 cores)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pgesam_train.config import data_preset
from pgesam_train.data import nsynth
from pgesam_train.data.build import build_dataset


@pytest.mark.slow
def test_one_soundfont_at_the_default_preset(tmp_path: Path) -> None:
    """Every family of one whole soundfont, 25 pitches, the full pitch screening: a real default-style build."""
    cfg = dataclasses.replace(data_preset("default"), soundfonts=("timgm6mb",))
    meta = build_dataset(cfg, tmp_path / "ds", preset_name="default-timgm6mb", log=lambda *_: None)
    counts, problems = nsynth.check_dataset(tmp_path / "ds")
    assert problems == []
    assert counts["train"] > counts["valid"] + counts["test"]  # groups are dealt in proportion to the quotas
    assert {e["program"] for e in meta["excluded_instruments"]} & {16, 17, 18}  # the 16' organs sound an octave low
    per_family: dict[str, set[int]] = {}
    for n in nsynth.load_split(tmp_path / "ds", "train"):
        per_family.setdefault(n.family_str, set()).add(n.instrument)
    # one soundfont leaves a single usable organ (programs 16-19 are excluded above), and the first group of a
    # family is dealt to test: every other family trains on at least two instruments
    assert set(per_family) == set(nsynth.FAMILIES) - {"organ"} and min(len(v) for v in per_family.values()) >= 2
