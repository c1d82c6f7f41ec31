"""Import shims for `encodec` 0.1.1 and `torchcrepe` 0.0.24 without torchaudio.

Both packages import torchaudio at import time (encodec in `encodec.utils` and `encodec.msstftd`, torchcrepe in
`torchcrepe.load`), and the torchaudio wheels on PyPI fail to load against the CPU build of torch we pin. We install
both packages with `pip install --no-deps` (see scripts/setup.sh) and, before importing them, put a stand-in
`torchaudio` module into `sys.modules`. We never call the torchaudio code paths of either package (audio I/O and
resampling are ours: soundfile and soxr), and the stand-in raises a clear error if anything tries to.

If a working torchaudio is installed, it is used and no stand-in is made.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _TorchaudioStandIn(types.ModuleType):
    """A `torchaudio` placeholder whose every attribute raises, so a stray call fails loudly, not silently."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchaudio.{name} was called, but pGESAM-RT runs without torchaudio "
                          "(see pgesam_train/compat.py); use soundfile/soxr instead")


def _ensure_torchaudio() -> None:
    if "torchaudio" in sys.modules:
        return
    try:
        importlib.import_module("torchaudio")
    except Exception:  # noqa: BLE001 - any failure (missing, ABI mismatch) means: use the stand-in
        sys.modules.pop("torchaudio", None)
        stand_in = _TorchaudioStandIn("torchaudio")
        stand_in.__dict__["__pgesam_stand_in__"] = True
        sys.modules["torchaudio"] = stand_in


def import_encodec() -> types.ModuleType:
    """`import encodec`, with the torchaudio stand-in when torchaudio is unusable."""
    _ensure_torchaudio()
    return importlib.import_module("encodec")


def import_torchcrepe() -> types.ModuleType:
    """`import torchcrepe`, with the torchaudio stand-in when torchaudio is unusable."""
    _ensure_torchaudio()
    return importlib.import_module("torchcrepe")
