"""Scheduling in samples: the audio clock, timed and immediate events, late bundles, sample-accurate notes.

Wall times here are made-up numbers fed to the clock; nothing depends on how fast this machine runs.
"""
from __future__ import annotations

import numpy as np
import pytest
from engine_fixtures import tiny_bundle  # noqa: F401 (pytest fixture)

from pgesam_engine.audio import NullBackend
from pgesam_engine.bundle import Bundle
from pgesam_engine.engine import Engine, EngineConfig, EngineError
from pgesam_engine.scheduler import AudioClock, Scheduler
from pgesam_engine.synth import Synth

SR = 24000
T0 = 1_700_000_000.0  # the wall time of sample 0 in these tests


def clock() -> AudioClock:
    c = AudioClock(SR)
    c.anchor(0, T0)
    return c


def test_clock_maps_wall_time_to_samples_and_back() -> None:
    c = clock()
    assert c.sample_at(T0 + 0.5) == 12000
    assert c.wall_at(12000) == pytest.approx(T0 + 0.5)
    c.anchor(24000, T0 + 1.0 + 0.001)  # 1 ms of callback jitter is smoothed, not followed
    assert abs(c.sample_at(T0 + 2.0) - 48000) < 24
    c.anchor(48000, T0 + 5.0)  # a jump (device restart) re-anchors at once
    assert c.sample_at(T0 + 5.0) == 48000


def test_clock_before_start_maps_everything_to_zero() -> None:
    c = AudioClock(SR)
    assert not c.running and c.sample_at(T0) == 0


def test_timed_and_immediate_targets() -> None:
    s = Scheduler(clock(), latency_samples=256)
    assert s.target(T0 + 0.25, arrival=T0 + 0.1) == (6000, True)
    assert s.target(None, arrival=T0 + 0.1) == (2400 + 256, False)  # arrival + one block
    with pytest.raises(ValueError, match="ahead"):
        s.target(T0 + 100.0, arrival=T0)


def test_due_events_come_in_order_with_their_offsets() -> None:
    s = Scheduler(clock(), 256)
    s.submit(600, "c")
    s.submit(300, "a")
    s.submit(300, "b")  # same sample: submission order
    s.submit(900, "later")
    got = [(off, ev.payload) for off, ev in s.due(256, 512)]
    assert got == [(44, "a"), (44, "b"), (344, "c")]
    assert not s.has_due(900) and s.has_due(901)
    assert [(off, ev.payload) for off, ev in s.due(768, 256)] == [(132, "later")]
    assert s.pending == 0 and s.late == 0 and not s.has_due(10 ** 9)


def test_late_timed_events_play_at_block_start_and_are_counted() -> None:
    s = Scheduler(clock(), 256)
    s.submit(100, "late bundle", timed=True)
    s.submit(120, "late immediate", timed=False)
    got = [(off, ev.payload) for off, ev in s.due(1024, 256)]
    assert got == [(0, "late bundle"), (0, "late immediate")]
    assert s.late == 1  # only timetagged events can be late


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    eng = Engine(synth, NullBackend(SR, 256), EngineConfig(prerender_default=False, release_s=0.01))
    eng.backend.clock.anchor(0, T0)
    eng.set_timbre(-0.5, -0.5)
    assert eng.prerenderer.wait_idle(60)
    yield eng
    eng.close()


def render(eng: Engine, start: int, n: int, block: int = 256) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for i in range(0, n, block):
        eng.render_block(out[i:i + block], start + i, T0 + (start + i) / SR)
    return out


def first_sound(x: np.ndarray) -> int:
    return int(np.flatnonzero(np.abs(x) > 0)[0])


def test_timetagged_note_starts_at_its_exact_sample(engine: Engine) -> None:
    engine.note(60, 127, at=T0 + 0.5, arrival=T0 + 0.01)
    engine.note_off(60, at=T0 + 0.6, arrival=T0 + 0.01)
    out = render(engine, 0, 24000)
    assert first_sound(out) == 12000
    release_end = 14400 + int(0.01 * SR)
    assert np.all(out[release_end + 1:] == 0) and np.abs(out[14000:14400]).max() > 0.01
    assert engine.scheduler.late == 0


def test_immediate_note_is_one_block_after_arrival(engine: Engine) -> None:
    engine.note(64, 100, arrival=T0 + 1.5)
    out = render(engine, 36096, 2048)
    assert 36096 + first_sound(out) == 36000 + 256
    engine.all_off(arrival=T0 + 1.5)
    render(engine, 38144, 2048)


def test_late_bundle_plays_at_once_and_is_counted(engine: Engine) -> None:
    before = engine.scheduler.late
    engine.note(67, 100, at=T0 + 2.0, arrival=T0 + 2.1)  # timetag already past when it arrives
    out = render(engine, 50176, 1024)
    assert first_sound(out) == 0 and engine.scheduler.late == before + 1
    engine.all_off(arrival=T0 + 2.1)
    render(engine, 51200, 2048)


def test_bad_requests_raise_engine_errors(engine: Engine) -> None:
    with pytest.raises(EngineError, match="outside this model's MIDI range 48-72"):
        engine.note(30, 100)
    with pytest.raises(EngineError, match="velocity"):
        engine.note(60, 300)
    with pytest.raises(EngineError, match="ahead"):
        engine.note(60, 100, at=T0 + 1000.0, arrival=T0)
    with pytest.raises(EngineError, match="both x and y"):
        engine.note(60, 100, x=0.1)
