"""Rendering notes of one (soundfont, GM program) instrument with FluidSynth, NSynth style.

A note is `duration_s` of mono audio at `sample_rate`: the key is held for `hold_s`, then released and the
release tail recorded. Reverb and chorus are off, so a note is the instrument's dry sound.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # pyfluidsynth over Debian's libfluidsynth3
    import fluidsynth
except ImportError as e:  # pragma: no cover - the message is the point
    fluidsynth = None
    _FLUIDSYNTH_ERROR = e

CLIP_LEVEL = 32767
CLIP_SAMPLES = 4  # a note with more full-scale samples than this is clipped


class RenderError(RuntimeError):
    """FluidSynth is unavailable or a soundfont/program cannot be rendered."""


@dataclass(frozen=True)
class RenderedNote:
    pitch: int
    audio: np.ndarray  # (samples,) float32, peak-normalised
    raw_peak_dbfs: float  # level before normalisation
    clipped: bool

    def silent(self, threshold_dbfs: float) -> bool:
        return self.raw_peak_dbfs < threshold_dbfs


class InstrumentRenderer:
    """Holds one FluidSynth synth with one soundfont loaded; renders notes of any of its programs."""

    def __init__(self, soundfont_path: Path, sample_rate: int = 16000):
        if fluidsynth is None:
            raise RenderError(f"pyfluidsynth could not be imported ({_FLUIDSYNTH_ERROR}); "
                              "install it with `pip install pyfluidsynth` and Debian's libfluidsynth3")
        if not Path(soundfont_path).is_file():
            raise RenderError(f"soundfont {soundfont_path} does not exist")
        self.sample_rate = sample_rate
        self.synth = fluidsynth.Synth(gain=1.0, samplerate=float(sample_rate),
                                      **{"synth.reverb.active": 0, "synth.chorus.active": 0})
        self.sfid = self.synth.sfload(str(soundfont_path))
        if self.sfid < 0:
            raise RenderError(f"FluidSynth could not load {soundfont_path}")

    def preset_name(self, program: int, bank: int = 0) -> str | None:
        """The soundfont's name for a GM program, or None when the soundfont lacks it."""
        name = self.synth.sfpreset_name(self.sfid, bank, program)
        return name.strip() if name else None

    def render(self, program: int, pitch: int, velocity: int, duration_s: float, hold_s: float,
               peak_dbfs: float) -> RenderedNote:
        """One note, peak-normalised to `peak_dbfs`."""
        if self.synth.program_select(0, self.sfid, 0, program) != 0:
            raise RenderError(f"program {program} is missing from this soundfont")
        total = round(duration_s * self.sample_rate)
        held = round(hold_s * self.sample_rate)
        self.synth.noteon(0, pitch, velocity)
        a = self.synth.get_samples(held)
        self.synth.noteoff(0, pitch)
        b = self.synth.get_samples(total - held)
        self._silence()
        stereo = np.concatenate([a, b]).reshape(-1, 2)
        mono = stereo[:, 0].astype(np.float32)  # GM instruments are centred: both channels carry the note
        clipped = int(np.sum(np.abs(stereo[:, 0].astype(np.int32)) >= CLIP_LEVEL)) > CLIP_SAMPLES
        peak = float(np.abs(mono).max())
        raw_dbfs = 20 * np.log10(max(peak, 1e-9) / CLIP_LEVEL)
        audio = mono * (10 ** (peak_dbfs / 20) / peak) if peak > 0 else mono
        return RenderedNote(pitch, audio.astype(np.float32), float(raw_dbfs), clipped)

    def _silence(self) -> None:
        """Cut every voice and flush, so the next note starts from silence."""
        self.synth.all_sounds_off(0)
        self.synth.system_reset()
        self.synth.get_samples(256)

    def close(self) -> None:
        self.synth.delete()
