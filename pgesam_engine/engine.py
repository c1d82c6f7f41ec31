"""The instrument: synth, timbre cache, streamer, voices, scheduler and audio backend tied together.

Its public methods are the OSC handlers (osc.py only routes to them); they are plain methods, callable from
tests or Python without any socket. Control methods run on the caller's thread and only hand events to the
scheduler; `render_block` is the audio callback and never calls the model.

Hardening (all limits in `EngineConfig`): the event queue and the number of notes generated at once are bounded
(`EngineBusy` and a counter when full); an immediate all-off also cancels every bundle scheduled before it; file
paths from clients can be confined to `output_dir` / `input_dir`; renders are written atomically; an audio device
that fails to open, reports itself gone, or stops asking for blocks is replaced by the null backend (a warning,
`audio_fallback` in the status) instead of stopping the instrument.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from .audio import Backend, NullBackend, write_wav_atomic
from .client_files import read_audio, wav_target
from .errors import EngineBusy, EngineError
from .process_stats import memory_mb
from .scheduler import Event, Scheduler
from .synth import Encoded, Synth, SynthError
from .timbre_cache import Prerenderer, Streamer, TimbreCache
from .voices import ArraySource, StreamSource, VoicePool, soft_limit, velocity_gain

log = logging.getLogger("pgesam.engine")


@dataclass(frozen=True)
class EngineConfig:
    """Everything tunable about the instrument, in one place."""
    max_voices: int = 16
    release_s: float = 0.08  # note-off fade, seconds
    steal_s: float = 0.005  # fade of a stolen voice, seconds
    velocity_curve: float = 2.0  # gain = (velocity / 127) ** curve
    master_gain: float = 0.7
    limiter_threshold: float = 0.8
    cache_mb: float = 256.0  # prerendered timbres kept in memory
    # notes generated together by one prerender worker; None: 25 on CUDA, 5 on CPU (2 cores, 2 workers: 2.4 s for
    # 25 pitches at batch 5 or 7, 2.6 s at 13, and the arena of a larger batch's KV caches costs ~90 MB more RSS)
    prerender_batch: int | None = None
    # threads sharing a prerender, each generating its share of the pitches with a one-thread decoder step;
    # None: one per CPU core (at most 4) on CPU, 1 on CUDA. 2 cores: 2.4-2.9 s against 3.4-5.1 s for one
    prerender_workers: int | None = None
    decode_batch: int = 5  # notes decoded together (between them streaming may run)
    stream_chunk: int = 8  # frames per streamed chunk
    allow_outside: bool = False  # True: timbre points off the covered region are used as given
    default_timbre: tuple[float, float] = (0.0, 0.0)
    prerender_default: bool = True  # prerender the default timbre at start
    switch_interval_s: float = 0.0005  # Python's GIL hand-over interval while running (default 5 ms: jitter)
    max_pending_events: int = 4096  # queued events (scheduled bundles included); more note-ons are dropped
    max_streams: int | None = None  # uncached notes generated at once; None: max_voices; more are dropped
    output_dir: str | None = None  # /pgesam/render writes only inside this folder (None: anywhere)
    input_dir: str | None = None  # /pgesam/encode reads only inside this folder (None: anywhere)
    audio_fallback: bool = True  # a failing audio device is replaced by the null backend instead of stopping
    audio_stall_s: float = 2.0  # a started device that asks for no block this long counts as gone


@dataclass(frozen=True)
class NoteOn:
    pitch: int
    gain: float
    source: ArraySource | StreamSource
    due: float  # wall time asked for: arrival (immediate) or timetag


@dataclass(frozen=True)
class NoteOff:
    pitch: int


ALL_OFF = "all_off"


def prerender_plan(config: EngineConfig, device: str) -> tuple[int, int]:
    """(notes per batch, workers) of a prerender: the config's, or the defaults for `device` (EngineConfig)."""
    batch = config.prerender_batch or (25 if device == "cuda" else 5)
    workers = config.prerender_workers or (1 if device == "cuda" else max(1, min(4, os.cpu_count() or 1)))
    return batch, workers


class Engine:
    """A playable instrument over a `Synth` and an audio `Backend` (call `start`, then the handlers)."""

    def __init__(self, synth: Synth, backend: Backend, config: EngineConfig = EngineConfig()):
        self.synth, self.backend, self.config = synth, backend, config
        m = synth.m
        self.sr = m.sample_rate
        if backend.sample_rate != self.sr:
            raise EngineError(f"audio backend runs at {backend.sample_rate} Hz, the bundle at {self.sr} Hz")
        self.cache = TimbreCache(m.pitch_min, m.n_pitches, m.note_samples, int(config.cache_mb * 2 ** 20))
        self.streamer = Streamer(synth, on_done=self.cache.put)
        batch, workers = prerender_plan(config, synth.device)
        self.prerenderer = Prerenderer(synth, self.cache, batch, config.decode_batch, give_way=self.streamer.give_way,
                                       workers=workers)
        self.voices = VoicePool(self.sr, config.max_voices, config.release_s, config.steal_s,
                                max_block=max(4096, backend.blocksize))
        self.scheduler = Scheduler(backend.clock, backend.latency_samples, max_pending=config.max_pending_events)
        self.timbre_point = self._point(*config.default_timbre)[:2]
        self.cache.pin(self.timbre_point)
        self.started = False
        self.max_streams = config.max_streams or config.max_voices
        self._streams: list[StreamSource] = []
        self.dropped_streams = 0
        self.audio_fallback = ""  # why the audio backend was replaced by null, if it was
        self.status_sources: list = []  # callables -> dict merged into status() (the OSC server's counters)
        self._generation = 0  # render callbacks of replaced backends are silenced by this
        self._watch_stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the audio backend (and the default timbre's prerender).

        Also shortens Python's thread switch interval (process-wide) so that the audio thread never waits
        milliseconds for the GIL while model threads run Python code.
        """
        if self.config.switch_interval_s:
            sys.setswitchinterval(self.config.switch_interval_s)
        try:
            self.backend.start(self._render_for(self._generation))
        except Exception as e:  # no device, device busy, PortAudio missing: play on without sound
            if not self.config.audio_fallback:
                raise
            self._fall_back(f"cannot start: {e}")
        self.scheduler.latency_samples = self.backend.latency_samples
        self.started = True
        if not isinstance(self.backend, NullBackend) and self.config.audio_fallback:
            self._watchdog = threading.Thread(target=self._watch_audio, name="pgesam-audio-watchdog", daemon=True)
            self._watchdog.start()
        if self.config.prerender_default:
            self.prerenderer.request(self.timbre_point)

    def close(self) -> None:
        self._watch_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2.0)
        if self.started:
            self.backend.stop()
            self.started = False
        self.streamer.close()
        self.prerenderer.close()

    def _render_for(self, generation: int):
        """The audio callback handed to a backend; silent once that backend has been replaced."""
        def render(out: np.ndarray, start: int, wall: float) -> None:
            if generation != self._generation:
                out.fill(0.0)
                return
            self.render_block(out, start, wall)
        return render

    def _fall_back(self, reason: str) -> None:
        """Replace the audio backend by the null one (same rate, block and clock timeline) and say why."""
        old = self.backend
        log.warning("audio backend %s failed: %s; falling back to the null backend: no sound, OSC keeps working",
                    old.name, reason)
        self._generation += 1
        null = NullBackend(old.sample_rate, old.blocksize)
        null.clock = old.clock  # queued timed events keep their samples
        null.underruns, null.errors, null.blocks = old.underruns, old.errors, old.blocks
        self.audio_fallback = f"{old.name}: {reason}"
        self.backend = null
        self.scheduler.latency_samples = null.latency_samples
        null.start(self._render_for(self._generation))
        threading.Thread(target=_stop_quietly, args=(old,), name="pgesam-audio-stop-old", daemon=True).start()

    def _watch_audio(self) -> None:
        """Fall back to null when the device says it is gone or has asked for no block for `audio_stall_s`."""
        stall = self.config.audio_stall_s
        last, since = -1, time.monotonic()
        while not self._watch_stop.wait(min(0.25, stall / 4)):
            b = self.backend
            if isinstance(b, NullBackend):
                return
            now = time.monotonic()
            if b.blocks != last:
                last, since = b.blocks, now
            if b.failed or now - since > stall:
                self._fall_back(b.failed or f"no audio block for {now - since:.1f} s (device gone?)")
                return

    # ----------------------------------------------------------------------------------------------- helpers
    def _point(self, x: float, y: float) -> tuple[float, float, bool]:
        """Clamp onto the covered region (unless allowed outside) and round to the cache key."""
        try:
            cx, cy, moved = self.synth.m.map.clamp(x, y, self.config.allow_outside)
        except ValueError as e:
            raise EngineError(str(e)) from e
        if moved:
            log.info("timbre point (%.3f, %.3f) is off the covered region; clamped to (%.3f, %.3f)", x, y, cx, cy)
        kx, ky = self.cache.key(cx, cy)
        return kx, ky, moved

    def _pitch(self, pitch: float) -> int:
        m = self.synth.m
        if not float(pitch).is_integer() or not m.pitch_min <= pitch <= m.pitch_max:
            raise EngineError(f"pitch {pitch} is outside this model's MIDI range {m.pitch_min}-{m.pitch_max}")
        return int(pitch)

    def _busy(self, what: str) -> EngineBusy:
        s = self.scheduler
        return EngineBusy(f"{what} dropped: {s.pending} events are queued (at most {s.max_pending}); "
                          "send /pgesam/all_off to cancel scheduled bundles")

    def _stream(self, kx: float, ky: float, pitch: int) -> StreamSource:
        """A streamed note, unless `max_streams` notes are already being generated."""
        live = [s for s in self._streams if not s.finished]
        if len(live) >= self.max_streams:
            self._streams = live
            self.dropped_streams += 1
            raise EngineBusy(f"note dropped: {len(live)} uncached notes are being generated already (at most "
                             f"{self.max_streams}); send /pgesam/timbre first so that its notes are prerendered")
        source = self.streamer.start_note((kx, ky), (kx, ky), pitch)
        live.append(source)
        self._streams = live
        return source

    def _when(self, at: float | None, arrival: float | None) -> tuple[int, bool]:
        arrival = time.time() if arrival is None else arrival
        try:
            return self.scheduler.target(at, arrival)
        except ValueError as e:
            raise EngineError(str(e)) from e

    # ----------------------------------------------------------------------------------------------- handlers
    def set_timbre(self, x: float, y: float) -> tuple[float, float, bool]:
        """/pgesam/timbre: make (x, y) the current timbre and prerender its pitches -> (x, y, clamped)."""
        kx, ky, moved = self._point(x, y)
        self.timbre_point = (kx, ky)
        self.cache.pin((kx, ky))  # notes played elsewhere meanwhile must not evict it
        self.prerenderer.request((kx, ky))
        return kx, ky, moved

    def note(self, pitch: float, velocity: float, x: float | None = None, y: float | None = None,
             at: float | None = None, arrival: float | None = None) -> tuple[float, float, bool]:
        """/pgesam/note: start `pitch` (MIDI) at `velocity` (1-127; 0 = note off) on the current timbre or on
        (x, y); `at` a timetag (time.time() seconds) or None for now -> (x, y, clamped) of the point used."""
        pitch = self._pitch(pitch)
        if not 0 <= velocity <= 127:
            raise EngineError(f"velocity {velocity} is outside 0-127")
        if (x is None) != (y is None):
            raise EngineError("give both x and y, or neither")
        if velocity == 0:
            self.note_off(pitch, at, arrival)
            return (*self.timbre_point, False)
        kx, ky, moved = self._point(x, y) if x is not None else (*self.timbre_point, False)
        sample, timed = self._when(at, arrival)
        if self.scheduler.pending >= self.scheduler.max_pending:  # refuse before any generation starts
            self.scheduler.dropped += 1
            raise self._busy("note")
        audio = self.cache.get(kx, ky, pitch)
        source = ArraySource(audio) if audio is not None else self._stream(kx, ky, pitch)
        due = at if timed else (time.time() if arrival is None else arrival)
        if self.scheduler.submit(sample, NoteOn(pitch, velocity_gain(velocity, self.config.velocity_curve), source,
                                                due), timed) is None:
            raise self._busy("note")
        return kx, ky, moved

    def note_off(self, pitch: float, at: float | None = None, arrival: float | None = None) -> None:
        """/pgesam/note_off: release every held voice of `pitch`."""
        pitch = self._pitch(pitch)
        sample, timed = self._when(at, arrival)
        if self.scheduler.submit(sample, NoteOff(pitch), timed, essential=True) is None:
            raise self._busy("note-off")

    def all_off(self, at: float | None = None, arrival: float | None = None) -> None:
        """/pgesam/all_off: release every voice. Without a timetag it also cancels every event sent before it,
        bundles scheduled for later included (a panic button); a timetagged one only releases the voices."""
        sample, timed = self._when(at, arrival)
        if self.scheduler.submit(sample, ALL_OFF, timed, essential=True) is None:
            raise self._busy("all-off")

    def render_note(self, x: float, y: float, pitch: float, path: str, velocity: float = 127) -> str:
        """/pgesam/render: write one whole note to a WAV file (float32, the bundle's rate) -> the path."""
        pitch = self._pitch(pitch)
        target = wav_target(path, self.config.output_dir)
        kx, ky, _ = self._point(x, y)
        audio = self.cache.get(kx, ky, pitch)
        if audio is None:
            audio = self.synth.render([[kx, ky]], [pitch])[0]
        write_wav_atomic(target, audio * velocity_gain(velocity, self.config.velocity_curve), self.sr)
        return str(target)

    def encode_file(self, path: str) -> Encoded:
        """/pgesam/encode: an audio file -> its map point, pitch and nearest training instruments."""
        audio, sr = read_audio(path, self.config.input_dir)
        try:
            return self.synth.encode_audio(audio, sr)
        except SynthError as e:
            raise EngineError(str(e)) from e

    def instruments(self) -> list[dict]:
        """/pgesam/map: the training instruments with their points."""
        return list(self.synth.m.map.instruments)

    def status(self) -> dict:
        """/pgesam/status: provider, voices, cache, underruns and latency figures."""
        now = self.voices.onset_stats(timed=False)
        timed = self.voices.onset_stats(timed=True)
        first = self.streamer.first_chunk_ms[np.isfinite(self.streamer.first_chunk_ms)]
        cache = self.cache.state()
        out = {
            "provider": self.synth.bundle.provider, "step": self.synth.step_mode,
            "variant": self.synth.bundle.variant or "float", "audio": self.backend.describe(),
            "voices": self.voices.active, "max_voices": self.config.max_voices,
            "timbre_x": self.timbre_point[0], "timbre_y": self.timbre_point[1],
            "cache_timbres": cache["timbres"], "cache_complete": cache["complete"],
            "cache_mb": round(cache["bytes"] / 2 ** 20, 1), "prerendering": int(self.prerenderer.busy),
            "prerender_s": round(self.prerenderer.last_seconds, 3), "streaming": int(not self.streamer.idle.is_set()),
            "underruns": self.backend.underruns, "audio_errors": self.backend.errors, "late": self.scheduler.late,
            "stolen": self.voices.stolen, "starved": self.voices.starved,
            "latency_ms_p50": round(now.get("p50_ms", -1.0), 3), "latency_ms_p99": round(now.get("p99_ms", -1.0), 3),
            "jitter_ms": round(now.get("jitter_ms", -1.0), 3),
            "timed_error_ms_p99": round(timed.get("p99_ms", -1.0), 3),
            "stream_first_ms_p50": round(float(np.median(first)), 3) if len(first) else -1.0,
            "provider_fallback": getattr(self.synth.bundle, "fallback", ""), "audio_fallback": self.audio_fallback,
            "audio_blocks": self.backend.blocks, "pending_events": self.scheduler.pending,
            "max_pending": self.scheduler.max_pending, "dropped_events": self.scheduler.dropped,
            "cancelled_events": self.scheduler.cancelled,
            "streams": sum(1 for s in self._streams if not s.finished), "max_streams": self.max_streams,
            "dropped_streams": self.dropped_streams, **memory_mb(),
        }
        for source in list(self.status_sources):
            out.update(source())
        return out

    # ----------------------------------------------------------------------------------------------- audio thread
    def render_block(self, out: np.ndarray, start: int, wall: float) -> None:
        """The audio callback: apply due events at their exact samples, mix voices, limit. out (n,) float32."""
        out.fill(0.0)
        if not self.voices.voices and not self.scheduler.has_due(start + len(out)):
            return  # idle: silence costs next to nothing
        pos = 0
        for offset, ev in self.scheduler.due(start, len(out)):
            if offset > pos:
                self.voices.render(out[pos:offset], start + pos, wall + pos / self.sr)
                pos = offset
            self._apply(ev)
        if pos < len(out):
            self.voices.render(out[pos:], start + pos, wall + pos / self.sr)
        out *= self.config.master_gain
        soft_limit(out, self.config.limiter_threshold)

    def _apply(self, ev: Event) -> None:
        payload = ev.payload
        if isinstance(payload, NoteOn):
            self.voices.note_on(payload.pitch, payload.gain, payload.source, payload.due, ev.timed)
        elif isinstance(payload, NoteOff):
            self.voices.note_off(payload.pitch)
        elif payload == ALL_OFF:
            self.voices.all_off()
            if not ev.timed:  # the panic button: nothing sent before it plays any more
                self.scheduler.cancel_before(ev.seq)


def _stop_quietly(backend: Backend) -> None:
    try:
        backend.stop()
    except Exception as e:  # a vanished device may fail to stop; it is replaced already
        log.info("stopping the replaced %s backend failed: %s", backend.name, e)
