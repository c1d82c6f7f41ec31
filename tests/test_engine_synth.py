"""Synthesis over the fixture bundle: KV-cache loop, batching, streaming, encoding, clamping, timbre cache."""
from __future__ import annotations

import numpy as np
import pytest
from engine_fixtures import dominant_hz, f0_of, reference_frames, tiny_bundle  # noqa: F401

from pgesam_engine.bundle import Bundle
from pgesam_engine.synth import Synth, SynthError
from pgesam_engine.timbre_cache import Prerenderer, Streamer, TimbreCache


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:  # noqa: F811
    return Bundle(tiny_bundle, providers="cpu", threads=1)


@pytest.fixture(scope="module")
def synth(bundle: Bundle) -> Synth:
    return Synth(bundle)


POINTS = np.array([[0.2, -0.5], [-1.0, 1.0], [0.3, 0.3]])
PITCHES = np.array([60, 48, 72])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_generation_follows_the_graphs_recurrence_over_the_whole_cache(bundle: Bundle, mode: str) -> None:
    synth = Synth(bundle, step_mode=mode)
    frames = synth.generate(POINTS, PITCHES)
    assert frames.shape == (3, 128, 300) and frames.dtype == np.float32
    np.testing.assert_allclose(frames, reference_frames(POINTS, PITCHES), atol=1e-4)


def test_batched_notes_equal_notes_one_by_one(synth: Synth) -> None:
    together = synth.generate(POINTS, PITCHES, n_frames=40)
    alone = np.concatenate([synth.generate(POINTS[i:i + 1], PITCHES[i:i + 1], n_frames=40) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_static_stepper_is_reused_and_reset_between_notes(bundle: Bundle) -> None:
    synth = Synth(bundle, step_mode="static")
    first = synth.generate(POINTS[:1], PITCHES[:1], n_frames=30)
    second = synth.generate(POINTS[1:2], PITCHES[1:2], n_frames=30)
    assert len(synth._static) == 1  # one fixed-buffer stepper for batch 1
    np.testing.assert_allclose(second, reference_frames(POINTS[1:2], PITCHES[1:2], 300)[:, :, :30], atol=1e-5)
    np.testing.assert_allclose(first, reference_frames(POINTS[:1], PITCHES[:1], 300)[:, :, :30], atol=1e-5)


def test_render_gives_whole_notes_at_the_right_pitch(synth: Synth) -> None:
    audio = synth.render(np.tile([-1.0, -1.0], (3, 1)), [48, 60, 69], batch_size=2)
    assert audio.shape == (3, 96000)
    for a, midi in zip(audio, [48, 60, 69]):
        assert dominant_hz(a[:24000]) == pytest.approx(f0_of(midi), rel=0.003)


def test_streamed_chunks_equal_the_whole_note_decode(synth: Synth) -> None:
    whole = synth.decode(synth.generate([[0.4, -0.2]], [57]))[0]
    chunks = list(synth.stream((0.4, -0.2), 57, chunk=7))  # 2, 4, then 7 frames at a time
    sizes = [len(c) // 320 for c in chunks]
    assert sizes[:4] == [2, 4, 7, 7] and sum(sizes) == 300 and max(sizes) == 7
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-5)


def test_pitch_outside_the_model_is_refused(synth: Synth) -> None:
    with pytest.raises(SynthError, match="MIDI pitch 73 is outside this model's range 48-72"):
        synth.generate([[0, 0]], [73])
    with pytest.raises(SynthError, match="n_frames"):
        synth.generate([[0, 0]], [60], n_frames=301)


def test_encoding_finds_pitch_and_nearest_instruments(synth: Synth) -> None:
    note = synth.render([[-1.0, -1.0]], [64])[0]
    enc = synth.encode_audio(note, 24000)
    assert enc.pitch == 64
    assert [d for _, d in enc.nearest] == sorted(d for _, d in enc.nearest)
    assert enc.nearest[0][1] == pytest.approx(np.hypot(enc.nearest[0][0]["x"] - enc.x, enc.nearest[0][0]["y"] - enc.y))
    resampled = synth.encode_audio(np.stack([note[::2], note[::2]], axis=1), 12000)  # stereo at 12 kHz
    assert resampled.pitch == 64 and abs(resampled.x - enc.x) < 0.05
    with pytest.raises(SynthError, match="non-empty"):
        synth.encode_audio(np.zeros(0), 24000)


def test_clamping_onto_the_covered_region(synth: Synth) -> None:
    m = synth.m.map
    assert m.clamp(0.3, 0.4) == (0.3, 0.4, False)
    x, y, moved = m.clamp(3.0, 4.0)
    assert moved and (x, y) == pytest.approx((0.6, 0.8))
    assert m.clamp(3.0, 4.0, allow_outside=True) == (3.0, 4.0, False)
    with pytest.raises(ValueError, match="finite"):
        m.clamp(float("nan"), 0.0)


def test_timbre_cache_is_a_memory_bounded_lru() -> None:
    cache = TimbreCache(48, 25, 1000, max_bytes=2 * 25 * 1000 * 4)  # room for two timbres
    cache.put((0.0, 0.0), 60, np.ones(1000, np.float32))
    cache.put((0.1, 0.0), 61, np.ones(1000, np.float32))
    assert cache.get(0.0, 0.0, 60) is not None  # (0, 0) is now the most recent
    cache.put((0.2, 0.0), 62, np.ones(1000, np.float32))  # evicts (0.1, 0)
    assert cache.get(0.1, 0.0, 61) is None and cache.get(0.0, 0.0, 60) is not None
    assert cache.get(0.0, 0.0, 61) is None  # other pitches of a timbre are not ready until rendered
    s = cache.state()
    assert s["timbres"] == 2 and s["bytes"] <= s["max_bytes"] and s["evictions"] == 1
    assert TimbreCache(48, 25, 1000, max_bytes=10).entry((0.0, 0.0)) is None  # too small to hold one


def test_the_pinned_timbre_survives_a_flood_of_other_points() -> None:
    cache = TimbreCache(48, 25, 1000, max_bytes=2 * 25 * 1000 * 4)
    cache.put((0.0, 0.0), 60, np.ones(1000, np.float32))
    cache.pin((0.0, 0.0))
    for k in range(1, 50):  # notes streamed at 49 other points, each stored when it finishes
        cache.put((k / 100, 0.0), 60, np.ones(1000, np.float32))
    assert cache.get(0.0, 0.0, 60) is not None and cache.get(0.49, 0.0, 60) is not None
    assert cache.state()["timbres"] == 2 and cache.state()["pinned"] == [0.0, 0.0]
    one = TimbreCache(48, 25, 1000, max_bytes=25 * 1000 * 4)  # room for the pinned timbre only
    one.put((0.0, 0.0), 60, np.ones(1000, np.float32))
    one.pin((0.0, 0.0))
    assert one.entry((0.5, 0.5)) is None and one.get(0.0, 0.0, 60) is not None
    one.pin((0.5, 0.5))  # a new current timbre: the old one gives way
    assert one.entry((0.5, 0.5)) is not None and one.get(0.0, 0.0, 60) is None


@pytest.mark.parametrize("workers", [1, 3])
def test_prerender_fills_every_pitch_with_what_render_gives(synth: Synth, workers: int) -> None:
    cache = TimbreCache(48, 25, synth.m.note_samples, 2 ** 30)
    pre = Prerenderer(synth, cache, batch_size=5, decode_batch=4, workers=workers)  # 3 workers: 9, 8, 8 rows
    try:
        pre.request((0.25, -0.25))
        assert pre.wait_idle(60)
        assert cache.state()["complete"] == 1 and pre.rendered == 1 and pre.failures == 0
        direct = synth.render([[0.25, -0.25], [0.25, -0.25]], [48, 72])
        for row, pitch in zip(direct, (48, 72)):  # the first and the last share
            np.testing.assert_allclose(cache.get(0.25, -0.25, pitch), row, atol=1e-5)
    finally:
        pre.close()


def test_prerender_worker_failure_is_reported_and_the_thread_serves_on(synth: Synth) -> None:
    cache = TimbreCache(48, 25, synth.m.note_samples, 2 ** 30)
    pre = Prerenderer(synth, cache, workers=2)
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return synth.decode(*args, **kwargs)
    try:
        pre.synth = type("S", (), {"generate": synth.generate, "decode": staticmethod(failing_once)})()
        pre.request((0.1, 0.1))
        assert pre.wait_idle(60) and pre.failures == 1 and "out of memory" in pre.last_error
        assert cache.state()["complete"] == 0  # the other worker's share is there, the timbre is not complete
        pre.request((0.1, 0.1))  # asked again: only the missing rows are rendered
        assert pre.wait_idle(60) and cache.state()["complete"] == 1
    finally:
        pre.close()
    with pytest.raises(ValueError, match="workers"):
        Prerenderer(synth, cache, workers=0)


def test_decoder_step_runs_one_thread_on_cpu(tiny_bundle) -> None:  # noqa: F811
    b = Bundle(tiny_bundle, providers="cpu", threads=2)
    threads = {name: s.get_session_options().intra_op_num_threads for name, s in b.sessions.items()}
    assert b.step_threads == 1 and threads["decoder_step"] == 1 and threads["codec_decoder"] == 2
    b3 = Bundle(tiny_bundle, providers="cpu", threads=2, step_threads=3)
    assert b3.sessions["decoder_step"].get_session_options().intra_op_num_threads == 3


def test_streamer_delivers_a_note_and_stores_it(synth: Synth) -> None:
    cache = TimbreCache(48, 25, synth.m.note_samples, 2 ** 30)
    streamer = Streamer(synth, on_done=cache.put)
    try:
        sources = [streamer.start_note((0.5, 0.5), (0.5, 0.5), p) for p in (50, 70)]  # two at once, in turns
        for _ in range(600):
            if all(s.finished for s in sources):
                break
            streamer.idle.wait(0.1)
        assert all(s.finished and not s.failed and s.available == 96000 for s in sources)
        np.testing.assert_allclose(sources[1].samples, synth.render([[0.5, 0.5]], [70])[0], atol=1e-5)
        assert cache.get(0.5, 0.5, 50) is not None and streamer.streamed == 2
    finally:
        streamer.close()


def test_stream_decoder_drops_the_codec_latency_across_chunks(synth: Synth) -> None:
    from pgesam_engine.synth import StreamDecoder
    frames = synth.generate([[0.0, 0.0]], [60], n_frames=10)
    session = synth.bundle.session("codec_decoder_stream")
    state = synth.m.stream_state
    plain, delayed = StreamDecoder(session, state, 1), StreamDecoder(session, state, 1, latency_samples=500)
    a = np.concatenate([plain.push(frames[:, :, i:i + 1])[0] for i in range(10)])
    b = np.concatenate([delayed.push(frames[:, :, i:i + 1])[0] for i in range(10)])
    assert len(b) == len(a) - 500
    np.testing.assert_array_equal(b, a[500:])
