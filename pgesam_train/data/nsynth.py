"""NSynth-format folders: the reader (ours and the real NSynth alike), the paper's filter, and the checker.

Layout: `nsynth-{train,valid,test}/examples.json` (a dict keyed by `note_str`) and
`nsynth-{split}/audio/<note_str>.wav` (16 kHz mono 16-bit, 4 s). `note_str` is
`{family}_{source}_{NNN}-{pitch:03d}-{velocity:03d}`.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead", "vocal")
SOURCES = ("acoustic", "electronic", "synthetic")
QUALITIES = ("bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic", "nonlinear_env",
             "percussive", "reverb", "tempo-synced")
SPLITS = ("train", "valid", "test")
NOTE_STR = re.compile(r"^(?P<family>[a-z_]+)_(?P<source>acoustic|electronic|synthetic)_(?P<num>\d{3})"
                      r"-(?P<pitch>\d{3})-(?P<velocity>\d{3})$")
REQUIRED_KEYS = ("note", "note_str", "instrument", "instrument_str", "instrument_source", "instrument_source_str",
                 "instrument_family", "instrument_family_str", "pitch", "velocity", "sample_rate", "qualities",
                 "qualities_str")


class DatasetError(ValueError):
    """An NSynth-format folder is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Note:
    """One note of an NSynth-format split."""
    note_str: str
    pitch: int  # MIDI
    velocity: int
    instrument: int  # NSynth instrument id (unique across the whole dataset)
    instrument_str: str
    family: int  # 0 bass ... 10 vocal
    source: int  # 0 acoustic, 1 electronic, 2 synthetic
    audio_path: Path

    @property
    def family_str(self) -> str:
        return FAMILIES[self.family]


def note_str(family: str, source: str, number: int, pitch: int, velocity: int) -> str:
    return f"{family}_{source}_{number:03d}-{pitch:03d}-{velocity:03d}"


def split_dir(root: Path, split: str) -> Path:
    return Path(root) / f"nsynth-{split}"


def read_examples(root: Path, split: str) -> dict[str, dict]:
    """The raw `examples.json` of one split, with a clear error when it is missing or malformed."""
    path = split_dir(root, split) / "examples.json"
    if not path.is_file():
        raise DatasetError(f"{path} not found: is {root} an NSynth-format folder (nsynth-{split}/examples.json)?")
    try:
        examples = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(examples, dict):
        raise DatasetError(f"{path} must hold a JSON object keyed by note_str")
    return examples


def _to_note(root: Path, split: str, key: str, ex: dict) -> Note:
    return Note(note_str=key, pitch=int(ex["pitch"]), velocity=int(ex["velocity"]), instrument=int(ex["instrument"]),
                instrument_str=ex["instrument_str"], family=int(ex["instrument_family"]),
                source=int(ex["instrument_source"]), audio_path=split_dir(root, split) / "audio" / f"{key}.wav")


@dataclass(frozen=True)
class NoteFilter:
    """The paper's filter: a pitch range, one velocity, at most `max_instruments_per_family` per family.

    Instruments beyond the cap are dropped at random with `seed` (reproducible).
    """
    pitch_min: int = 48
    pitch_max: int = 72
    velocity: int | None = 100
    max_instruments_per_family: int | None = 10
    seed: int = 0

    def apply(self, notes: list[Note]) -> list[Note]:
        kept = [n for n in notes if self.pitch_min <= n.pitch <= self.pitch_max
                and (self.velocity is None or n.velocity == self.velocity)]
        if self.max_instruments_per_family is None:
            return kept
        by_family: dict[int, set[int]] = {}
        for n in kept:
            by_family.setdefault(n.family, set()).add(n.instrument)
        rng = random.Random(self.seed)
        allowed: set[int] = set()
        for fam in sorted(by_family):
            insts = sorted(by_family[fam])
            rng.shuffle(insts)
            allowed.update(insts[: self.max_instruments_per_family])
        return [n for n in kept if n.instrument in allowed]


def load_split(root: Path, split: str, note_filter: NoteFilter | None = None) -> list[Note]:
    """Notes of one split, sorted by `note_str`, optionally filtered (`NoteFilter()` is the paper's filter)."""
    examples = read_examples(root, split)
    notes = sorted((_to_note(root, split, k, ex) for k, ex in examples.items()), key=lambda n: n.note_str)
    return note_filter.apply(notes) if note_filter else notes


def load_audio(note: Note, expected_sr: int = 16000) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of one note."""
    audio, sr = sf.read(note.audio_path, dtype="float32", always_2d=False)
    if sr != expected_sr:
        raise DatasetError(f"{note.audio_path}: sample rate {sr} Hz, expected {expected_sr} Hz")
    if audio.ndim != 1:
        raise DatasetError(f"{note.audio_path}: {audio.shape[1]} channels, expected mono")
    return audio


def check_dataset(root: Path, sample_rate: int = 16000, duration_s: float = 4.0,
                  splits: tuple[str, ...] = SPLITS) -> tuple[dict[str, int], list[str]]:
    """Validate an NSynth-format folder. Returns (notes per split, list of problems); never raises on content."""
    counts: dict[str, int] = {}
    problems: list[str] = []
    instrument_split: dict[int, str] = {}
    for split in splits:
        try:
            examples = read_examples(root, split)
        except DatasetError as e:
            problems.append(str(e))
            continue
        counts[split] = len(examples)
        for key, ex in examples.items():
            problems.extend(_check_example(root, split, key, ex, sample_rate, duration_s, instrument_split))
    return counts, problems


def _check_example(root: Path, split: str, key: str, ex: dict, sample_rate: int, duration_s: float,
                   instrument_split: dict[int, str]) -> list[str]:
    where = f"nsynth-{split}/{key}"
    missing = [k for k in REQUIRED_KEYS if k not in ex]
    if missing:
        return [f"{where}: missing keys {missing}"]
    out = []
    m = NOTE_STR.match(key)
    if key != ex["note_str"]:
        out.append(f"{where}: key differs from note_str {ex['note_str']!r}")
    if not m:
        out.append(f"{where}: note id does not match {{family}}_{{source}}_{{NNN}}-{{pitch:03d}}-{{velocity:03d}}")
    elif (int(m["pitch"]), int(m["velocity"])) != (ex["pitch"], ex["velocity"]):
        out.append(f"{where}: pitch/velocity in the id differ from the fields ({ex['pitch']}, {ex['velocity']})")
    if not 0 <= ex["instrument_family"] < len(FAMILIES) or FAMILIES[ex["instrument_family"]] != ex["instrument_family_str"]:
        out.append(f"{where}: family {ex['instrument_family']} / {ex['instrument_family_str']!r} is not an NSynth family")
    prev = instrument_split.setdefault(ex["instrument"], split)
    if prev != split:
        out.append(f"{where}: instrument {ex['instrument']} also appears in split {prev!r} (splits must be disjoint)")
    out.extend(_check_audio(split_dir(root, split) / "audio" / f"{key}.wav", where, sample_rate, duration_s))
    return out


def _check_audio(path: Path, where: str, sample_rate: int, duration_s: float) -> list[str]:
    if not path.is_file():
        return [f"{where}: audio file {path} is missing"]
    try:
        info = sf.info(str(path))
    except RuntimeError as e:
        return [f"{where}: unreadable audio ({e})"]
    out = []
    if info.samplerate != sample_rate:
        out.append(f"{where}: sample rate {info.samplerate} Hz, expected {sample_rate}")
    if info.channels != 1:
        out.append(f"{where}: {info.channels} channels, expected mono")
    if info.frames != round(sample_rate * duration_s):
        out.append(f"{where}: {info.frames} samples, expected {round(sample_rate * duration_s)}")
    if info.subtype != "PCM_16":
        out.append(f"{where}: sample format {info.subtype}, expected PCM_16")
    return out
