"""Voices, envelopes and limiter numerics (no model, no audio device)."""
from __future__ import annotations

import numpy as np
import pytest

from pgesam_engine.voices import ArraySource, StreamSource, VoicePool, soft_limit, velocity_gain

SR = 24000


def dc(n: int = SR, value: float = 1.0) -> ArraySource:
    """A constant 'note' makes envelopes directly readable in the output."""
    return ArraySource(np.full(n, value, np.float32))


def run(pool: VoicePool, n: int, block: int = 256) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for i in range(0, n, block):
        pool.render(out[i:i + block], i)
    return out


def test_velocity_gain_curve() -> None:
    assert velocity_gain(127) == 1.0 and velocity_gain(0) == 0.0
    assert velocity_gain(63.5) == pytest.approx(0.25)  # curve 2: half velocity = -12 dB
    assert velocity_gain(63.5, curve=1.0) == pytest.approx(0.5)
    gains = [velocity_gain(v) for v in range(128)]
    assert np.all(np.diff(gains) > 0)
    assert velocity_gain(500) == 1.0 and velocity_gain(-3) == 0.0


def test_soft_limiter_is_identity_below_threshold_and_bounded_above() -> None:
    x = np.linspace(-0.8, 0.8, 101).astype(np.float32)
    assert np.array_equal(soft_limit(x.copy(), 0.8), x)
    big = np.linspace(-50, 50, 10001).astype(np.float32)
    y = soft_limit(big.copy(), 0.8)
    assert np.all(np.abs(y) < 1.0 + 1e-6)
    assert np.all(np.diff(y) >= 0)  # monotonic
    knee = soft_limit(np.array([0.8, 0.8001, 0.81], np.float32), 0.8)
    assert np.allclose(np.diff(knee) / np.diff([0.8, 0.8001, 0.81]), 1.0, atol=0.01)  # slope 1 at the knee


def test_note_plays_source_times_gain() -> None:
    pool = VoicePool(SR)
    src = np.sin(np.arange(1000) * 0.1).astype(np.float32)
    pool.note_on(60, 0.5, ArraySource(src))
    out = run(pool, 1200)
    assert np.allclose(out[:1000], 0.5 * src, atol=1e-7)
    assert np.all(out[1000:] == 0) and pool.active == 0  # the voice ends with its audio


def test_release_is_a_linear_fade_without_clicks() -> None:
    pool = VoicePool(SR, release_s=0.08)
    pool.note_on(60, 1.0, dc())
    out = np.zeros(4000, np.float32)
    pool.render(out[:1000])
    pool.note_off(60)
    pool.render(out[1000:])
    fade = int(0.08 * SR)
    assert np.all(out[:1000] == 1.0)
    assert np.allclose(out[1000:1000 + fade], 1.0 - np.arange(1, fade + 1) / fade, atol=1e-5)
    assert np.all(out[1000 + fade:] == 0.0)
    assert np.max(np.abs(np.diff(out))) <= 1.0 / fade + 1e-6  # no step larger than one fade increment
    assert pool.active == 0


def test_voice_limit_steals_the_oldest_with_a_short_fade() -> None:
    pool = VoicePool(SR, max_voices=2, steal_s=0.005)
    pool.note_on(60, 1.0, dc())
    pool.note_on(62, 1.0, dc())
    run(pool, 256)  # both sounding
    pool.note_on(64, 1.0, dc())
    assert pool.stolen == 1
    out = run(pool, 1024)
    fade = int(0.005 * SR)
    # voices 62 and 64 hold at 1 each; 60 fades 1 -> 0 over 5 ms on top of them
    assert np.allclose(out[:fade], 2.0 + 1.0 - np.arange(1, fade + 1) / fade, atol=1e-5)
    assert np.all(out[fade + 1:] == 2.0)
    assert sorted(v.pitch for v in pool.voices) == [62, 64]


def test_same_pitch_retrigger_releases_the_old_voice() -> None:
    pool = VoicePool(SR, release_s=0.01)
    pool.note_on(60, 1.0, dc())
    run(pool, 256)
    pool.note_on(60, 1.0, dc())
    out = run(pool, 1024)
    assert out[0] > 1.9 and out[-1] == pytest.approx(1.0)  # old one faded out, new one holds


def test_all_off_releases_everything_and_unstarted_voices_never_sound() -> None:
    pool = VoicePool(SR, release_s=0.01)
    for pitch in (60, 64, 67):
        pool.note_on(pitch, 1.0, dc())
    run(pool, 256)
    pool.note_on(70, 1.0, dc())  # not rendered yet: all_off drops it silently
    pool.all_off()
    out = run(pool, 1024)
    assert out[0] < 3.0 and np.all(out[240:] == 0) and pool.active == 0


def test_stream_source_pending_start_and_starvation() -> None:
    pool = VoicePool(SR)
    src = StreamSource(2000)
    pool.note_on(60, 1.0, src)
    out = run(pool, 512)
    assert np.all(out == 0) and pool.starved == 0  # waiting for the first chunk is not starvation
    src.write(np.ones(300, np.float32))
    out = run(pool, 512)
    assert np.all(out[:300] == 1.0) and np.all(out[300:] == 0) and pool.starved >= 1
    src.write(np.full(1700, 0.5, np.float32))
    src.finish()
    out = run(pool, 2048)
    assert np.all(out[:1700] == 0.5) and np.all(out[1700:] == 0) and pool.active == 0


def test_blocks_longer_than_the_scratch_buffers_are_mixed_in_pieces() -> None:
    pool = VoicePool(SR, max_block=256)
    pool.note_on(60, 1.0, dc(3000))
    out = np.zeros(2000, np.float32)
    pool.render(out)
    assert np.all(out == 1.0)


def test_hard_cap_bounds_the_number_of_fading_voices() -> None:
    pool = VoicePool(SR, max_voices=2, steal_s=1.0)
    for pitch in range(48, 60):
        pool.note_on(pitch, 1.0, dc())
        run(pool, 16)
    assert len(pool.voices) <= 4


def test_onset_log_measures_from_due_time() -> None:
    pool = VoicePool(SR)
    pool.note_on(60, 1.0, dc(), due=100.0)
    pool.render(np.zeros(256, np.float32), 0, wall=100.012)
    stats = pool.onset_stats()
    assert stats["count"] == 1 and stats["p50_ms"] == pytest.approx(12.0, abs=1e-6)
