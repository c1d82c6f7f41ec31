"""Figures of the timbre map in the style of the paper's Figures 3 and 4: mu of every note as a point, one base
colour per instrument family, shifted hue and brightness per instrument id, the unit circle drawn.

Writes PNG files only (matplotlib Agg backend); no torch here.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from pgesam_train.data.nsynth import FAMILIES  # noqa: E402

HUE_SPREAD = 0.035  # hue offset range (fraction of the colour wheel) across the instruments of one family


def family_rgb(family: int, shade: float = 0.5) -> tuple[float, float, float]:
    """Base colour of a family (0..10) shaded by `shade` in [0, 1]: small hue shift and brightness change."""
    hue = (family / len(FAMILIES) + (shade - 0.5) * 2 * HUE_SPREAD) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85, 0.55 + 0.4 * shade)


def note_colors(family: np.ndarray, instrument: np.ndarray) -> np.ndarray:
    """RGB (N, 3) per note: its family's colour, shaded by the rank of its instrument within the family."""
    colors = np.zeros((len(family), 3))
    for fam in np.unique(family):
        insts = np.unique(instrument[family == fam])
        for rank, inst in enumerate(insts):
            shade = rank / (len(insts) - 1) if len(insts) > 1 else 0.5
            colors[(family == fam) & (instrument == inst)] = family_rgb(int(fam), shade)
    return colors


def plot_map(ax: Axes, mu: np.ndarray, family: np.ndarray, instrument: np.ndarray, title: str) -> None:
    """Scatter mu (N, 2) on `ax` with the unit circle, equal axes and a family legend."""
    ax.scatter(mu[:, 0], mu[:, 1], c=note_colors(family, instrument), s=6, linewidths=0)
    t = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(t), np.sin(t), color="0.5", lw=0.8, ls="--")
    lim = max(1.1, float(np.abs(mu).max()) * 1.05) if len(mu) else 1.1
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("$\\tilde\\mu_x$")
    ax.set_ylabel("$\\tilde\\mu_y$")
    ax.set_title(title)
    handles = [Line2D([], [], marker="o", ls="", color=family_rgb(int(f)), label=FAMILIES[int(f)])
               for f in np.unique(family)]
    ax.legend(handles=handles, fontsize=6, loc="upper right", framealpha=0.6)


def save_timbre_map(path: Path, mu: np.ndarray, family: np.ndarray, instrument: np.ndarray, title: str) -> Path:
    """One Figure-3-style map as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 6))
    plot_map(ax, mu, family, instrument, title)
    return _save(fig, path)


def save_ablation_figure(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """A Figure-4-style grid (2 x 2 for four panels) of (title, mu, family, instrument) maps as a PNG."""
    if not panels:
        raise ValueError("no ablation maps to plot")
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 5.5 * rows), squeeze=False)
    for ax, (title, mu, family, instrument) in zip(axes.flat, panels):
        plot_map(ax, mu, family, instrument, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
