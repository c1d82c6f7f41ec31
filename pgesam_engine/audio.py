"""Audio backends: where the engine's mono blocks go.

    sounddevice        a PortAudio output (device choice, block size); when the device cannot open the bundle's
                       rate (24 kHz) it opens at its own default rate and soxr resamples the stream
    null               no sound, clocked in real time by a thread (servers, tests, benchmarks)
    file:PATH          like null, and every block is recorded to a WAV file (the performance)

A backend calls `render(out, start_sample, wall)` once per block: `out` (n,) float32 to fill, `start_sample` the
audio-clock index of out[0], `wall` the time.time() at which out[0] is heard. The call is wrapped so that the
audio thread never raises: an exception silences that block and is counted in `errors`. A backend that learns its
device is gone sets `failed` (the engine then falls back to null). `write_wav_atomic` is how every rendered note
reaches disk: a temporary file in the same folder, then `os.replace`, so a crash leaves no file or a whole one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .scheduler import AudioClock

log = logging.getLogger("pgesam.audio")
RenderFn = Callable[[np.ndarray, int, float], None]


class AudioError(Exception):
    """An audio backend that cannot be opened; the message says what to try instead."""


def realtime_priority(priority: int = 10) -> bool:
    """Ask for SCHED_FIFO for the calling thread (as audio servers do); False where the OS says no.

    The thread sleeps between blocks, so it only ever preempts others for the few hundred microseconds a block
    takes; it is what keeps wake-ups within ~0.1 ms on a loaded machine.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (AttributeError, OSError):  # not Linux, or no permission (RLIMIT_RTPRIO): stay a normal thread
        return False


class Backend:
    """Shared state: clock, block size, counters. Subclasses run the clock and call `_block`."""
    name = "backend"

    def __init__(self, sample_rate: int, blocksize: int = 256):
        self.sample_rate, self.blocksize = sample_rate, blocksize
        self.clock = AudioClock(sample_rate)
        self.underruns = self.errors = self.blocks = 0
        self.last_error = ""
        self.failed = ""  # set (with the reason) when the device is known to be gone
        self.output_latency_samples = 0
        self._render: RenderFn | None = None

    @property
    def latency_samples(self) -> int:
        """How far ahead of a packet's arrival an immediate event is placed: one block + output latency."""
        return self.blocksize + self.output_latency_samples

    def _block(self, out: np.ndarray, start: int, wall: float, anchor: float | None = None) -> None:
        """Anchor the clock (at `anchor`, default `wall`) and render one block; never raises."""
        self.clock.anchor(start, wall if anchor is None else anchor)
        try:
            self._render(out, start, wall)
        except Exception as e:  # the audio thread must survive anything
            out.fill(0.0)
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
        self.blocks += 1

    def start(self, render: RenderFn) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} {self.sample_rate} Hz, block {self.blocksize}"


class NullBackend(Backend):
    """Real-time clocked silence: block k is rendered at t0 + k * blocksize / sample_rate.

    The clock is anchored on those nominal times (the virtual DAC); `wall` passed to the renderer is the real
    time the block was made, so a late wake-up shows in the measured note-on latency instead of being hidden.

    A block rendered more than one block period after its time counts as an underrun; after half a second
    behind, the clock skips ahead instead of rushing to catch up.
    """
    name = "null"

    def __init__(self, sample_rate: int, blocksize: int = 256):
        super().__init__(sample_rate, blocksize)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, render: RenderFn) -> None:
        self._render = render
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"pgesam-audio-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        realtime_priority()
        n, sr = self.blocksize, self.sample_rate
        buf = np.zeros(n, np.float32)
        t0, k = time.time() + 0.01, 0
        base = self.clock.sample_at(t0) if self.clock.running else 0  # a clock taken over keeps its timeline
        while not self._stop.is_set():
            due = t0 + k * n / sr
            now = time.time()
            if now < due:
                time.sleep(due - now)
            elif now - due > n / sr:
                self.underruns += 1
                if now - due > 0.5:
                    t0 = now - k * n / sr
                    due = now
            self._block(buf, base + k * n, max(due, time.time()), anchor=due)
            try:
                self._write(buf)
            except Exception as e:  # e.g. disk full while recording: keep the clock (and the engine) running
                if not self.errors or self.last_error != f"{type(e).__name__}: {e}":
                    log.error("%s backend cannot write audio: %s: %s", self.name, type(e).__name__, e)
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
            k += 1

    def _write(self, block: np.ndarray) -> None:
        """Where a rendered block goes (nowhere for null)."""

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


class FileBackend(NullBackend):
    """Null's real-time clock, with every block written to a WAV file (24-bit PCM) until `stop`."""
    name = "file"

    def __init__(self, path: Path | str, sample_rate: int, blocksize: int = 256):
        super().__init__(sample_rate, blocksize)
        import soundfile
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise AudioError(f"cannot record to {self.path}: folder {self.path.parent} does not exist")
        self._file = soundfile.SoundFile(str(self.path), "w", samplerate=sample_rate, channels=1, subtype="PCM_24")
        self.frames_written = 0

    def _write(self, block: np.ndarray) -> None:
        self._file.write(block)
        self.frames_written += len(block)

    def stop(self) -> None:
        super().stop()
        if not self._file.closed:
            self._file.close()

    def describe(self) -> str:
        return f"file {self.path} ({self.sample_rate} Hz, block {self.blocksize})"


class Resampler:
    """Blocks at the device rate from a renderer at the engine rate, through a soxr stream and a FIFO."""

    def __init__(self, render: Callable[[np.ndarray], None], in_rate: int, out_rate: int, blocksize: int,
                 max_frames: int = 8192):
        import soxr
        self.render, self.blocksize = render, blocksize
        self.stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        self.fifo = np.zeros(max_frames + 4 * blocksize * max(1, -(-out_rate // in_rate)), np.float32)
        self.fill = 0
        self._in = np.zeros(blocksize, np.float32)

    def pull(self, out: np.ndarray) -> None:
        """Fill `out` (frames,) with device-rate audio."""
        need = len(out)
        while self.fill < need:
            self.render(self._in)
            y = self.stream.resample_chunk(self._in)
            m = min(len(y), len(self.fifo) - self.fill)
            self.fifo[self.fill:self.fill + m] = y[:m]
            self.fill += m
        out[:] = self.fifo[:need]
        self.fifo[:self.fill - need] = self.fifo[need:self.fill]
        self.fill -= need


class SoundDeviceBackend(Backend):
    """A PortAudio output stream. Mono engine audio is copied to every device channel."""
    name = "sounddevice"

    def __init__(self, sample_rate: int, blocksize: int = 256, device: int | str | None = None):
        super().__init__(sample_rate, blocksize)
        try:
            import sounddevice as sd
        except OSError as e:  # libportaudio missing
            raise AudioError(f"sounddevice cannot load PortAudio ({e}); install libportaudio2 or use --audio null")
        self.sd, self.device = sd, device
        self.stream = None
        self.device_rate = sample_rate
        self._resampler: Resampler | None = None
        self._start = self._first = 0
        self._wall = 0.0
        self._mono = np.zeros(8192, np.float32)
        self._stopping = False

    def _channels(self) -> int:
        info = self.sd.query_devices(self.device, "output")
        return max(1, min(2, int(info["max_output_channels"])))

    def start(self, render: RenderFn) -> None:
        self._render = render
        try:
            channels = self._channels()
            try:
                self.sd.check_output_settings(self.device, samplerate=self.sample_rate, channels=channels)
            except Exception:
                self.device_rate = int(self.sd.query_devices(self.device, "output")["default_samplerate"])
                log.info("device cannot open %d Hz; resampling to %d Hz", self.sample_rate, self.device_rate)
                self._resampler = Resampler(self._engine_block, self.sample_rate, self.device_rate, self.blocksize)
            self._stopping = False
            self.stream = self.sd.OutputStream(samplerate=self.device_rate, blocksize=self.blocksize,
                                               device=self.device, channels=channels, dtype="float32",
                                               latency="low", callback=self._callback,
                                               finished_callback=self._finished)
            self.output_latency_samples = int(self.stream.latency * self.sample_rate)
            self.stream.start()
        except Exception as e:
            raise AudioError(f"cannot open audio device {self.device!r}: {e}; try --device, or --audio null") from e

    def _finished(self) -> None:
        """PortAudio ended the stream: on our `stop`, or because the device went away."""
        if not self._stopping:
            self.failed = f"the output stream of device {self.device!r} stopped (unplugged or taken away?)"

    def _engine_block(self, out: np.ndarray) -> None:
        self._block(out, self._start, self._wall + (self._start - self._first) / self.sample_rate)
        self._start += len(out)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        try:
            if status.output_underflow:
                self.underruns += 1
            self._wall = time.time() + (time_info.outputBufferDacTime - time_info.currentTime)
            self._first = self._start
            mono = self._mono[:frames]
            if self._resampler is not None:
                self._resampler.pull(mono)
            else:
                self._block(mono, self._start, self._wall)
                self._start += frames
            outdata[:] = mono[:, None]
        except Exception as e:
            outdata.fill(0.0)
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stopping = True
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):  # a vanished device may refuse to stop; it is gone either way
                stream.stop()
            with contextlib.suppress(Exception):
                stream.close()

    def describe(self) -> str:
        rate = f"{self.device_rate} Hz (resampled from {self.sample_rate})" if self._resampler else \
            f"{self.sample_rate} Hz"
        return f"sounddevice {self.device if self.device is not None else 'default'} {rate}, block {self.blocksize}"


def open_backend(spec: str, sample_rate: int, blocksize: int = 256, device: int | str | None = None) -> Backend:
    """'sounddevice' | 'null' | 'file:PATH' -> a backend (not started)."""
    if blocksize < 16 or blocksize > 8192:
        raise AudioError(f"block size {blocksize} is out of range 16-8192")
    if spec == "null":
        return NullBackend(sample_rate, blocksize)
    if spec.startswith("file:"):
        if not spec[5:]:
            raise AudioError("file backend needs a path: --audio file:performance.wav")
        return FileBackend(spec[5:], sample_rate, blocksize)
    if spec == "sounddevice":
        return SoundDeviceBackend(sample_rate, blocksize, device)
    raise AudioError(f"unknown audio backend {spec!r}; use sounddevice, null or file:PATH")


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def write_wav_atomic(path: Path | str, audio: np.ndarray, sample_rate: int, subtype: str = "FLOAT") -> Path:
    """Write `audio` (samples,) as a WAV file at `path` atomically -> the path.

    The samples go to a hidden temporary file in the same folder (`.NAME.XXXX.part`), which is flushed to disk
    and then renamed over `path` with `os.replace`: a reader, or a process killed at any moment, sees either no
    file (or the previous one) or the whole new file, never a partial one. A symlink at `path` is replaced, not
    followed. A failed write removes the temporary file.
    """
    import soundfile
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            soundfile.write(f, audio, sample_rate, subtype=subtype, format="WAV")
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def list_devices() -> str:
    """PortAudio's device list as text, or why there is none."""
    try:
        import sounddevice as sd
        return str(sd.query_devices()) or "no audio devices"
    except Exception as e:
        return f"no audio devices ({type(e).__name__}: {e})"
