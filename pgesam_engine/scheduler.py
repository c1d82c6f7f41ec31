"""Sample-accurate scheduling of timed events on the audio clock.

OSC bundles carry absolute timetags (SuperCollider sends now + latency). python-osc's own dispatcher sleeps in
the handler until that time; we do not: the OSC thread converts the timetag to an audio-clock sample with
`AudioClock` and hands the event over, and the audio thread applies it at that exact sample of its block.
    timed event     sample = the clock's sample for the timetag; if that sample was already rendered the event
                    is late: it plays at the start of the next block and `late` is counted
    immediate event sample = the clock's sample for the packet's arrival + `latency_samples` (one block, plus the
                    device's output latency): a constant delay instead of a jitter of up to one block
Handover is a deque (append/popleft are atomic in CPython): the audio thread never waits on a lock.
Bounded: at most `max_pending` queued events; past that new note-ons are refused (`dropped`), while note-offs and
all-offs may use `reserve` more slots so that a full queue never strands a sounding note. `cancel_before(seq)`
(an immediate all-off) drops every event submitted before it, future bundles included (`cancelled`).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class AudioClock:
    """Maps wall-clock seconds (time.time()) to audio samples and back.

    The backend calls `anchor(sample, wall)` every block with the wall time at which `sample` is heard. Small
    differences from the running estimate are smoothed (callback jitter); a jump over `reset_s` re-anchors.
    """

    def __init__(self, sample_rate: int, smoothing: float = 0.05, reset_s: float = 0.02):
        self.sample_rate = sample_rate
        self.smoothing, self.reset_s = smoothing, reset_s
        self._offset: float | None = None  # wall - sample / sr

    @property
    def running(self) -> bool:
        return self._offset is not None

    def anchor(self, sample: int, wall: float) -> None:
        offset = wall - sample / self.sample_rate
        if self._offset is None or abs(offset - self._offset) > self.reset_s:
            self._offset = offset
        else:
            self._offset += self.smoothing * (offset - self._offset)

    def sample_at(self, wall: float) -> int:
        """The sample heard at `wall` (seconds since the epoch); 0 before the clock runs."""
        if self._offset is None:
            return 0
        return int(round((wall - self._offset) * self.sample_rate))

    def wall_at(self, sample: int) -> float:
        if self._offset is None:
            raise RuntimeError("the audio clock is not running yet")
        return self._offset + sample / self.sample_rate


@dataclass(order=True)
class Event:
    """Something to apply at an audio sample; equal samples keep submission order."""
    sample: int
    seq: int
    payload: Any = field(compare=False)
    timed: bool = field(default=False, compare=False)


class Scheduler:
    """Timed events between the control thread (`submit`) and the audio thread (`due`)."""

    def __init__(self, clock: AudioClock, latency_samples: int, horizon_s: float = 60.0, max_pending: int = 4096,
                 reserve: int = 1024):
        self.clock = clock
        self.latency_samples = latency_samples
        self.horizon_s = horizon_s
        self.max_pending, self.reserve = max_pending, reserve
        self._inbox: deque[Event] = deque()
        self._heap: list[Event] = []
        self._seq = itertools.count()
        self.late = 0
        self.scheduled = 0
        self.dropped = self.cancelled = 0

    def target(self, at: float | None, arrival: float) -> tuple[int, bool]:
        """Sample for an event asked for at wall time `at` (None: immediate) that arrived at `arrival`.

        Returns (sample, timed). Raises ValueError for a timetag more than `horizon_s` ahead.
        """
        if at is None:
            return self.clock.sample_at(arrival) + self.latency_samples, False
        if at - arrival > self.horizon_s:
            raise ValueError(f"timetag is {at - arrival:.1f} s ahead; at most {self.horizon_s:.0f} s is accepted")
        return self.clock.sample_at(at), True

    def submit(self, sample: int, payload: Any, timed: bool = False, essential: bool = False) -> Event | None:
        """Queue `payload` for audio sample `sample` (any thread) -> the event, or None when the queue is full.

        A full queue is `max_pending` events (`max_pending + reserve` for `essential` ones: note-offs, all-offs);
        a refused event is counted in `dropped`.
        """
        if self.pending >= self.max_pending + (self.reserve if essential else 0):
            self.dropped += 1
            return None
        ev = Event(int(sample), next(self._seq), payload, timed)
        self._inbox.append(ev)
        self.scheduled += 1
        return ev

    def due(self, block_start: int, n: int) -> Iterator[tuple[int, Event]]:
        """(offset in block, event) for every event before block_start + n, in order (audio thread only).

        An event whose sample is before block_start is late: offset 0, and a timed one is counted in `late`.
        """
        inbox, heap = self._inbox, self._heap
        while inbox:
            heapq.heappush(heap, inbox.popleft())
        end = block_start + n
        while heap and heap[0].sample < end:
            ev = heapq.heappop(heap)
            offset = ev.sample - block_start
            if offset < 0:
                offset = 0
                if ev.timed:
                    self.late += 1
            yield offset, ev

    def has_due(self, end: int) -> bool:
        """Whether any event is waiting for a sample before `end` (audio thread only)."""
        return bool(self._inbox) or bool(self._heap and self._heap[0].sample < end)

    @property
    def pending(self) -> int:
        return len(self._heap) + len(self._inbox)

    def cancel_before(self, seq: int) -> int:
        """Drop every queued event submitted before event `seq`, and `seq` itself (audio thread only) -> how many
        were dropped."""
        inbox, heap = self._inbox, self._heap
        while inbox:
            heapq.heappush(heap, inbox.popleft())
        keep = [ev for ev in heap if ev.seq > seq]
        n = len(heap) - len(keep)
        if n:
            heapq.heapify(keep)
            heap[:] = keep
            self.cancelled += n
        return n

    def clear(self) -> None:
        """Drop every queued event (audio thread, or when the audio is stopped)."""
        self._inbox.clear()
        self._heap.clear()
