"""Model work off the audio path: the timbre cache, its background prerenderer, and the note streamer.

    TimbreCache   timbre point -> all pitches' audio (n_pitches, samples) float32, filled row by row; a bounded
                  LRU (bytes), so a note-on on a cached timbre plays from memory with no model work; the
                  current timbre is pinned, so notes streamed at other points never evict it
    Prerenderer   one thread: setting a timbre renders all its pitches in batches, split over `workers` threads
                  (each generating its share of the pitches on its own core); only the newest request waits
                  (dragging across the map does not queue a render per message); it gives way to streaming
    Streamer      one thread: notes not in the cache are generated and decoded a few frames at a time into a
                  `StreamSource` the voice already plays from; several notes advance in turn, chunk by chunk
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .synth import Synth
from .voices import StreamSource

log = logging.getLogger("pgesam.cache")
Key = tuple[float, float]


class TimbreEntry:
    """All pitches of one timbre point; `ready[i]` says whether row i (pitch_min + i) holds audio."""

    def __init__(self, key: Key, n_pitches: int, samples: int):
        self.key = key
        self.audio = np.zeros((n_pitches, samples), np.float32)
        self.ready = np.zeros(n_pitches, bool)

    @property
    def nbytes(self) -> int:
        return self.audio.nbytes

    @property
    def complete(self) -> bool:
        return bool(self.ready.all())


class TimbreCache:
    """Bounded LRU of `TimbreEntry`s keyed by the point rounded to `decimals`. Thread-safe.

    `pin(key)` exempts one key (the current timbre) from eviction: a flood of notes at other points evicts
    only other entries, and gets no entry (it streams uncached) when the pinned one leaves no room.
    """

    def __init__(self, pitch_min: int, n_pitches: int, samples: int, max_bytes: int, decimals: int = 3):
        self.pitch_min, self.n_pitches, self.samples = pitch_min, n_pitches, samples
        self.max_bytes, self.decimals = max_bytes, decimals
        self._entries: OrderedDict[Key, TimbreEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.pinned: Key | None = None
        self.hits = self.misses = self.evictions = 0

    def key(self, x: float, y: float) -> Key:
        return (round(float(x), self.decimals), round(float(y), self.decimals))

    def pin(self, key: Key | None) -> None:
        """Keep `key` whatever else arrives (None unpins); the previously pinned entry becomes evictable."""
        with self._lock:
            self.pinned = key

    @property
    def entry_bytes(self) -> int:
        return self.n_pitches * self.samples * 4

    def get(self, x: float, y: float, pitch: int) -> np.ndarray | None:
        """The note's audio (samples,) if rendered, else None; a hit makes the timbre most recent."""
        with self._lock:
            entry = self._entries.get(self.key(x, y))
            i = pitch - self.pitch_min
            if entry is None or not entry.ready[i]:
                self.misses += 1
                return None
            self._entries.move_to_end(entry.key)
            self.hits += 1
            return entry.audio[i]

    def entry(self, key: Key) -> TimbreEntry | None:
        """The entry for `key`, made (evicting least recent ones) if the memory limit allows one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            while (len(self._entries) + 1) * self.entry_bytes > self.max_bytes:
                victim = next((k for k in self._entries if k != self.pinned), None)  # least recent first
                if victim is None:
                    return None  # too small for one more entry beside the pinned one
                del self._entries[victim]
                self.evictions += 1
            entry = self._entries[key] = TimbreEntry(key, self.n_pitches, self.samples)
            return entry

    def put(self, key: Key, pitch: int, audio: np.ndarray) -> None:
        """Store one note (e.g. a finished stream) under its timbre."""
        entry = self.entry(key)
        if entry is not None:
            n = min(len(audio), self.samples)
            entry.audio[pitch - self.pitch_min, :n] = audio[:n]
            entry.ready[pitch - self.pitch_min] = True

    def state(self) -> dict:
        with self._lock:
            return {"timbres": len(self._entries), "complete": sum(e.complete for e in self._entries.values()),
                    "bytes": len(self._entries) * self.entry_bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "pinned": list(self.pinned) if self.pinned is not None else None}


class Prerenderer:
    """Background thread rendering every pitch of the most recently requested timbre into the cache."""

    def __init__(self, synth: Synth, cache: TimbreCache, batch_size: int = 25, decode_batch: int = 5,
                 give_way: Callable[[], None] | None = None, workers: int = 1):
        if workers < 1 or batch_size < 1 or decode_batch < 1:
            raise ValueError(f"prerender workers, batch and decode batch must be >= 1, got {workers}, "
                             f"{batch_size}, {decode_batch}")
        self.synth, self.cache = synth, cache
        self.batch_size, self.decode_batch, self.workers = batch_size, decode_batch, workers
        self.give_way = give_way
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pgesam-prerender-work") if workers > 1 else None
        self._pending: Key | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._stop = False
        self.rendered = self.failures = 0
        self.last_seconds = 0.0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="pgesam-prerender", daemon=True)
        self._thread.start()

    def request(self, key: Key) -> None:
        """Render `key` next (replacing any request still waiting)."""
        with self._cond:
            self._pending = key
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self._busy or self._pending is not None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or rendering; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending is not None)
                if self._stop:
                    return
                key, self._pending, self._busy = self._pending, None, True
            try:
                self._render(key)
            except Exception as e:  # keep serving; say why in the log and the status
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("prerender of %s failed: %s", key, self.last_error)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _render(self, key: Key) -> None:
        entry = self.cache.entry(key)
        if entry is None or entry.complete:
            return
        t0 = time.perf_counter()
        missing = np.flatnonzero(~entry.ready)
        shares = [rows for rows in np.array_split(missing, self.workers) if len(rows)]
        if self._pool is None or len(shares) < 2:
            self._render_rows(entry, key, missing)
        else:  # every share to the end, then the first failure (if any) is raised
            futures = [self._pool.submit(self._render_rows, entry, key, rows) for rows in shares]
            wait(futures)
            for f in futures:
                f.result()
        self.rendered += 1
        self.last_seconds = time.perf_counter() - t0
        log.info("prerendered timbre %s (%d notes) in %.2f s", key, len(missing), self.last_seconds)

    def _render_rows(self, entry: TimbreEntry, key: Key, missing: np.ndarray) -> None:
        """Generate and decode rows `missing` of `entry` (timbre `key`) in batches."""
        for i in range(0, len(missing), self.batch_size):
            rows = missing[i:i + self.batch_size]
            points = np.tile(np.array(key, np.float32), (len(rows), 1))
            frames = self.synth.generate(points, rows + self.cache.pitch_min, between_steps=self.give_way)
            for j in range(0, len(rows), self.decode_batch):
                if self.give_way is not None:
                    self.give_way()
                part = rows[j:j + self.decode_batch]
                entry.audio[part] = self.synth.decode(frames[j:j + self.decode_batch])[:, :self.cache.samples]
                entry.ready[part] = True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=not self._thread.is_alive(), cancel_futures=True)


class _Job:
    def __init__(self, source: StreamSource, chunks: Iterator[np.ndarray], key: Key, pitch: int):
        self.source, self.chunks, self.key, self.pitch = source, chunks, key, pitch
        self.t0 = time.perf_counter()


class Streamer:
    """Background thread streaming uncached notes chunk by chunk; `idle` is set while it has nothing to do."""

    def __init__(self, synth: Synth, on_done: Callable[[Key, int, np.ndarray], None] | None = None):
        self.synth, self.on_done = synth, on_done
        self.idle = threading.Event()
        self.idle.set()
        self._jobs: list[_Job] = []
        self._new: list[_Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self.streamed = self.failures = self._firsts = 0
        self.first_chunk_ms = np.full(256, np.nan)
        self._thread = threading.Thread(target=self._run, name="pgesam-stream", daemon=True)
        self._thread.start()

    def start_note(self, key: Key, point: tuple[float, float], pitch: int) -> StreamSource:
        """A source the voice can play at once; its audio arrives as it is generated."""
        source = StreamSource(self.synth.m.note_samples)
        job = _Job(source, self.synth.stream(point, pitch), key, pitch)
        with self._cond:
            self.idle.clear()
            self._new.append(job)
            self._cond.notify_all()
        return source

    def give_way(self) -> None:
        """Called by other model work between steps: wait while notes are streaming."""
        while not self._stop and not self.idle.wait(0.1):
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._new or self._jobs)
                if self._stop:
                    return
                self._jobs.extend(self._new)
                self._new.clear()
            self._jobs = [job for job in self._jobs if self._advance(job)]
            with self._cond:
                if not self._jobs and not self._new:
                    self.idle.set()

    def _advance(self, job: _Job) -> bool:
        """One chunk of one job; False when the job is over."""
        try:
            chunk = next(job.chunks)
        except StopIteration:
            job.source.finish()
            self.streamed += 1
            if self.on_done is not None:
                self.on_done(job.key, job.pitch, job.source.samples)
            return False
        except Exception as e:
            job.source.finish(failed=True)
            self.failures += 1
            log.error("streaming pitch %d at %s failed: %s: %s", job.pitch, job.key, type(e).__name__, e)
            return False
        if job.source.available == 0:
            self.first_chunk_ms[self._firsts % len(self.first_chunk_ms)] = 1000 * (time.perf_counter() - job.t0)
            self._firsts += 1
        job.source.write(chunk)
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
