"""Audio backends without a sound card: file recording, a callback that never raises, resampling, bad specs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from engine_fixtures import dominant_hz

from pgesam_engine.audio import AudioError, FileBackend, NullBackend, Resampler, open_backend


def wait_blocks(backend: NullBackend, n: int, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while backend.blocks < n and time.time() < end:
        time.sleep(0.01)
    assert backend.blocks >= n, "the backend thread did not run"


def test_file_backend_records_every_rendered_block(tmp_path: Path) -> None:
    path = tmp_path / "rec.wav"
    backend = FileBackend(path, 24000, 128)

    def render(out: np.ndarray, start: int, wall: float) -> None:
        out[:] = ((start + np.arange(len(out))) % 100) / 200.0  # a ramp that encodes the sample index

    backend.start(render)
    wait_blocks(backend, 20)
    backend.stop()
    audio, sr = soundfile.read(str(path), dtype="float32")
    assert sr == 24000 and len(audio) == backend.frames_written and len(audio) % 128 == 0
    np.testing.assert_allclose(audio, (np.arange(len(audio)) % 100) / 200.0, atol=1e-6)  # no gaps or repeats


def test_a_failing_render_is_silenced_and_counted_never_raised() -> None:
    backend = NullBackend(24000, 256)
    calls = []

    def render(out: np.ndarray, start: int, wall: float) -> None:
        calls.append(start)
        out[:] = 1.0
        raise RuntimeError("model exploded")

    backend.start(render)
    wait_blocks(backend, 5)
    backend.stop()
    assert backend.errors >= 5 and "model exploded" in backend.last_error
    assert calls[:3] == [0, 256, 512]  # the clock keeps counting samples


def test_null_backend_anchors_the_clock_on_its_block_times() -> None:
    backend = NullBackend(24000, 256)
    backend.start(lambda out, start, wall: None)
    wait_blocks(backend, 3)
    backend.stop()
    c = backend.clock
    assert c.running and c.sample_at(c.wall_at(123456)) == 123456


def test_resampler_makes_device_rate_blocks_from_engine_blocks() -> None:
    phase = [0]

    def engine_block(out: np.ndarray) -> None:  # a 440 Hz sine at 24 kHz, block after block
        n = np.arange(phase[0], phase[0] + len(out))
        out[:] = 0.5 * np.sin(2 * np.pi * 440.0 * n / 24000)
        phase[0] += len(out)

    rs = Resampler(engine_block, 24000, 48000, 256)
    blocks = []
    for _ in range(60):
        out = np.zeros(512, np.float32)
        rs.pull(out)
        blocks.append(out)
    y = np.concatenate(blocks)[4800:]  # after the resampler's start-up delay
    assert dominant_hz(y, sr=48000) == pytest.approx(440.0, rel=1e-3)
    assert np.max(np.abs(np.diff(y))) < 2 * np.pi * 440 / 48000 * 0.5 * 1.05  # smooth: no block seams


def test_bad_backend_specs() -> None:
    with pytest.raises(AudioError, match="unknown audio backend 'jack'"):
        open_backend("jack", 24000)
    with pytest.raises(AudioError, match="needs a path"):
        open_backend("file:", 24000)
    with pytest.raises(AudioError, match="folder .* does not exist"):
        open_backend("file:/no/such/dir/x.wav", 24000)
    with pytest.raises(AudioError, match="block size 4 is out of range"):
        open_backend("null", 24000, blocksize=4)


def test_sounddevice_without_a_device_is_a_clear_error() -> None:
    pytest.importorskip("sounddevice")
    import sounddevice as sd
    try:
        has_output = any(d["max_output_channels"] > 0 for d in sd.query_devices())
    except Exception:
        has_output = False
    if has_output:
        pytest.skip("this machine has an audio output")
    backend = open_backend("sounddevice", 24000, 256)
    with pytest.raises(AudioError, match="try --device, or --audio null"):
        backend.start(lambda out, start, wall: None)
