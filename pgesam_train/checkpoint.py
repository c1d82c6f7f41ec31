"""Checkpoints that carry their config: save atomically, load with a kind and format check, resume.

A checkpoint is a dict: {"format", "kind", "config" (dataclasses.asdict), "model" (state_dict), "optimizer",
"step", "epoch", "extra"}. Models are rebuilt from "config" alone (see `pgesam_train.config.from_dict`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pgesam_engine.hashing import sha256_of as file_sha256  # noqa: F401  (re-exported: checkpoint identity)

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, of another kind, or of an unknown format."""


def save_checkpoint(path: Path, kind: str, config: dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, epoch: int = 0,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint via a temporary file and rename, so an interrupted save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "kind": kind, "config": config, "model": model.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "step": step, "epoch": epoch, "extra": extra or {}}
    return _write_atomically(state, path)


def _write_atomically(state: dict, path: Path) -> Path:
    """torch.save via a temporary file and rename, so an interrupted save never leaves a broken file."""
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, kind: str) -> dict:
    """Load a checkpoint of the given kind on the CPU, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {kind} checkpoint at {path}: train one with `pgesam-train {kind} train`")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is a {found!r} checkpoint, expected {kind!r}")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')}, this version reads {FORMAT}")
    return state


def without_optimizer(src: Path, dst: Path) -> Path:
    """Copy checkpoint `src` to `dst` without its optimizer state (a third of the size): the form committed to the
    repository. Training resumes from it with fresh optimizer moments; everything else (config, weights, step,
    epoch, extra) is kept."""
    state = torch.load(Path(src), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{src} is not a pgesam checkpoint")
    state["optimizer"] = None
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomically(state, dst)
