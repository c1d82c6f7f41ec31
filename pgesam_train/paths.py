"""One cache root for everything generated: datasets, latent caches, checkpoints, runs.

`PGESAM_HOME` overrides the default `~/.cache/pgesam`. Nothing generated is written into the repository.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root (created on first use)."""
    root = Path(os.environ.get("PGESAM_HOME") or Path.home() / ".cache" / "pgesam").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def dataset_dir(preset: str) -> Path:
    """Where `pgesam-train dataset build --preset P` writes by default."""
    return home() / "datasets" / f"soundfonts-{preset}"


def latents_dir(dataset: Path, codec_id: str) -> Path:
    """Latent cache for one dataset encoded by one codec (see `pgesam_train.data.latents`)."""
    return home() / "latents" / f"{Path(dataset).name}--{codec_id}"


def checkpoints_dir(kind: str, preset: str) -> Path:
    """Checkpoints of one model kind (`codec`, `vae`, `transformer`) at one preset."""
    return home() / "checkpoints" / kind / preset


def runs_dir(name: str) -> Path:
    """Logs, figures and evaluation outputs of one command."""
    return home() / "runs" / name
