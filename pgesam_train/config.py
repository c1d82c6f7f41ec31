"""Config dataclasses and their presets, in one place.

Every checkpoint stores its config with `dataclasses.asdict` and a format version, and models are rebuilt from
that stored config only (whisper's `ModelDimensions` habit). Presets: `tiny` (tests, seconds), `small`
(2 CPU cores, the shipped model), `paper` (the sizes of Limberg et al. 2025). Data presets: `tiny`, `default`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

MODEL_PRESETS = ("tiny", "small", "paper")
DATA_PRESETS = ("tiny", "default")
SPLITS = ("train", "valid", "test")

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], d: dict) -> T:
    """Rebuild a config dataclass from `to_dict` output; unknown keys are an error, lists become tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


def preset(table: dict[str, T], name: str, what: str) -> T:
    """Look up a preset by name with a clear error."""
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {', '.join(table)}")
    return table[name]


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """How the NSynth-format dataset is rendered from General-MIDI soundfonts.

    Audio follows NSynth: `sample_rate` Hz mono 16-bit, `duration_s` long, key held `hold_s` then released.
    """
    soundfonts: tuple[str, ...] = ("fluidr3", "musescore", "fluidr3mono", "timgm6mb", "sf_gmbank", "opl3")
    families: tuple[str, ...] | None = None  # None: all 11 NSynth families
    programs: tuple[int, ...] | None = None  # None: every usable GM program of the chosen families
    pitch_min: int = 48  # MIDI, inclusive
    pitch_max: int = 72  # MIDI, inclusive
    velocity: int = 100
    sample_rate: int = 16000
    duration_s: float = 4.0
    hold_s: float = 3.0
    instruments_per_split: tuple[int, int, int] = (10, 3, 3)  # at most this many per family in train/valid/test
    pitch_check_notes: int = 3  # notes per instrument judged by the pitch tracker (0 disables the check)
    pitch_tolerance_cents: float = 50.0
    peak_dbfs: float = -1.0  # every note is peak-normalised to this level
    silence_dbfs: float = -50.0  # notes whose peak stays below this are dropped as silent
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("pitch_min", "pitch_max", "velocity"):
            v = getattr(self, name)
            if not 0 <= v <= 127:
                raise ValueError(f"{name}={v} is outside the MIDI range 0-127")
        if self.pitch_min > self.pitch_max:
            raise ValueError(f"pitch_min {self.pitch_min} > pitch_max {self.pitch_max}")
        if not 0 < self.hold_s <= self.duration_s:
            raise ValueError("hold_s must be in (0, duration_s]")

    @property
    def pitches(self) -> tuple[int, ...]:
        return tuple(range(self.pitch_min, self.pitch_max + 1))


DATA_PRESET_TABLE: dict[str, DataConfig] = {
    # 2 families x 3 programs of one small soundfont, 3 pitches: renders in well under a second.
    "tiny": DataConfig(soundfonts=("timgm6mb",), families=("keyboard", "string"), programs=(0, 1, 2, 40, 41, 42),
                       pitch_min=59, pitch_max=61, instruments_per_split=(1, 1, 1), pitch_check_notes=1),
    "default": DataConfig(),
}


def data_preset(name: str) -> DataConfig:
    return preset(DATA_PRESET_TABLE, name, "data")


# ------------------------------------------------------------------------------- models (below)
