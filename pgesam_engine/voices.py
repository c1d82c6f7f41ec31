"""Polyphony: voices playing note audio from memory or from a stream, mixed into audio blocks.

Everything here runs on the audio thread: no model calls, no locks, no allocation beyond block-sized scratch
buffers made once. Times are in samples at the engine's sample rate; gains are linear amplitude.
    velocity_gain   MIDI velocity 1-127 -> gain, (v / 127) ** curve (curve 2: -6 dB per halving of velocity)
    release         note-off fades linearly to silence over `release_s` (80 ms default): no clicks
    stealing        above `max_voices` the oldest held voice fades out over `steal_s` (5 ms)
    soft_limit      identity below `threshold`, then a tanh knee that never exceeds 1.0
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def velocity_gain(velocity: float, curve: float = 2.0) -> float:
    """MIDI velocity 0-127 -> linear gain in [0, 1]; 127 -> 1.0, 0 -> 0.0."""
    v = min(max(float(velocity), 0.0), 127.0) / 127.0
    return v ** curve


def soft_limit(x: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """Soft-limit `x` in place and return it: |y| = |x| below `threshold`, t + (1-t)·tanh((|x|-t)/(1-t)) above.

    Continuous with slope 1 at the knee, monotonic, and |y| < 1 for every input.
    """
    t = float(threshold)
    if x.size == 0 or float(np.max(np.abs(x))) <= t:
        return x
    over = np.abs(x) > t
    a = np.abs(x[over])
    x[over] = np.sign(x[over]) * (t + (1.0 - t) * np.tanh((a - t) / (1.0 - t)))
    return x


class ArraySource:
    """Note audio already in memory (a prerendered note): samples (n,) float32, all available."""

    def __init__(self, samples: np.ndarray):
        self.samples = samples
        self.available = len(samples)
        self.finished = True


class StreamSource:
    """Note audio still being generated: a preallocated buffer the stream worker fills from the front.

    `available` grows as chunks are written (the worker writes the samples before publishing the count);
    `finished` is set when no more will come.
    """

    def __init__(self, length: int):
        self.samples = np.zeros(length, np.float32)
        self.available = 0
        self.finished = False
        self.failed = False

    def write(self, chunk: np.ndarray) -> None:
        start = self.available
        n = min(len(chunk), len(self.samples) - start)
        self.samples[start:start + n] = chunk[:n]
        self.available = start + n

    def finish(self, failed: bool = False) -> None:
        self.failed = failed
        self.finished = True


HELD, RELEASING, DONE = 0, 1, 2


@dataclass(eq=False)
class Voice:
    """One sounding note. `due` is the wall time the note was asked for (packet arrival, or its timetag)."""
    pitch: int
    gain: float
    source: ArraySource | StreamSource
    due: float = 0.0
    timed: bool = False
    pos: int = 0  # samples of the source played
    env: float = 1.0  # current release-envelope level
    fade: float = 0.0  # envelope decrement per sample while releasing
    state: int = HELD
    started: bool = False
    order: int = field(default=0)


class VoicePool:
    """Voices, their envelopes and their mix. Call from the audio thread only (status readers just read ints)."""

    def __init__(self, sample_rate: int, max_voices: int = 16, release_s: float = 0.08, steal_s: float = 0.005,
                 max_block: int = 4096, log_size: int = 1024):
        self.sr, self.max_voices = sample_rate, max_voices
        self.release_fade = 1.0 / max(1.0, release_s * sample_rate)
        self.steal_fade = 1.0 / max(1.0, steal_s * sample_rate)
        self.voices: list[Voice] = []
        self._ramp = np.arange(1, max_block + 1, dtype=np.float32)
        self._env = np.empty(max_block, np.float32)
        self._tmp = np.empty(max_block, np.float32)
        self.max_block = max_block
        self._order = 0
        self.stolen = self.starved = 0
        # onset log: seconds from `due` to the note's first output sample, immediate and timed notes apart
        self.onset_delay = {False: np.full(log_size, np.nan), True: np.full(log_size, np.nan)}
        self._onset_i = {False: 0, True: 0}

    @property
    def active(self) -> int:
        return sum(1 for v in self.voices if v.state != DONE)

    def note_on(self, pitch: int, gain: float, source: ArraySource | StreamSource, due: float = 0.0,
                timed: bool = False) -> Voice:
        """Start a voice; a held voice of the same pitch is released, and the oldest is stolen when full."""
        self.note_off(pitch)
        held = [v for v in self.voices if v.state == HELD]
        if len(held) >= self.max_voices:
            oldest = min(held, key=lambda v: v.order)
            self._release(oldest, self.steal_fade)
            self.stolen += 1
        if len(self.voices) >= 2 * self.max_voices:  # hard cap: drop the oldest fading voice
            fading = [v for v in self.voices if v.state != HELD] or self.voices
            self.voices.remove(min(fading, key=lambda v: v.order))
        self._order += 1
        voice = Voice(pitch, gain, source, due=due, timed=timed, order=self._order)
        self.voices.append(voice)
        return voice

    def _release(self, v: Voice, fade: float) -> None:
        if not v.started:
            v.state = DONE  # never sounded: nothing to fade
        elif v.state == HELD or fade > v.fade:
            v.state, v.fade = RELEASING, fade

    def note_off(self, pitch: int) -> None:
        for v in self.voices:
            if v.pitch == pitch and v.state == HELD:
                self._release(v, self.release_fade)

    def all_off(self) -> None:
        for v in self.voices:
            if v.state != DONE:
                self._release(v, self.release_fade)

    def render(self, out: np.ndarray, start_sample: int = 0, wall: float = 0.0) -> None:
        """Add every voice into `out` (n,) float32, whose first sample is `start_sample`, heard at `wall`."""
        for i in range(0, len(out), self.max_block):
            seg = out[i:i + self.max_block]
            for v in self.voices:
                if v.state != DONE:
                    self._mix(v, seg, wall + i / self.sr)
        self.voices = [v for v in self.voices if v.state != DONE]

    def _mix(self, v: Voice, out: np.ndarray, wall: float) -> None:
        src = v.source
        n = min(len(out), src.available - v.pos)
        if n <= 0:
            if src.finished or src.available >= len(src.samples):
                v.state = DONE
            elif v.started:
                self.starved += 1
            return
        if not v.started:
            v.started = True
            self._log_onset(v, wall)
        chunk = src.samples[v.pos:v.pos + n]
        if v.state == RELEASING:
            env = self._env[:n]
            np.multiply(self._ramp[:n], -v.fade, out=env)
            env += v.env
            np.maximum(env, 0.0, out=env)
            v.env = float(env[-1])
            np.multiply(chunk, env, out=self._tmp[:n])
            self._tmp[:n] *= v.gain
            if v.env <= 0.0:
                v.state = DONE
        else:
            np.multiply(chunk, v.gain, out=self._tmp[:n])
        out[:n] += self._tmp[:n]
        v.pos += n
        if n < len(out) and not (src.finished or src.available >= len(src.samples)):
            self.starved += 1

    def _log_onset(self, v: Voice, wall: float) -> None:
        if v.due <= 0.0:
            return
        i = self._onset_i[v.timed]
        self.onset_delay[v.timed][i % len(self.onset_delay[v.timed])] = wall - v.due
        self._onset_i[v.timed] = i + 1

    def onset_stats(self, timed: bool = False) -> dict[str, float]:
        """Delay from `due` to the first output sample in ms: count, p50, p99, jitter (p99 - p1)."""
        d = self.onset_delay[timed]
        d = d[np.isfinite(d)] * 1000.0
        if not len(d):
            return {"count": 0}
        p1, p50, p99 = np.percentile(d, [1, 50, 99])
        return {"count": int(len(d)), "p50_ms": float(p50), "p99_ms": float(p99), "jitter_ms": float(p99 - p1)}
