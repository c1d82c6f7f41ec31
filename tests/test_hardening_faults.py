"""Faults: an audio device that fails to open or goes away (fake backends), SIGTERM during a recorded
performance, the CUDA provider failing at load, and the serve command's network and audio options."""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from engine_fixtures import ask_raw, spawn_serve, status_of, tiny_bundle, udp_socket  # noqa: F401 (fixture)

from pgesam_engine import bundle as bundle_mod
from pgesam_engine.audio import AudioError, Backend, NullBackend, list_devices
from pgesam_engine.bundle import Bundle
from pgesam_engine.cli import cli
from pgesam_engine.engine import Engine, EngineConfig
from pgesam_engine.osc import Router
from pgesam_engine.synth import Synth


@pytest.fixture(scope="module")
def synth(tiny_bundle: Path) -> Synth:  # noqa: F811
    return Synth(Bundle(tiny_bundle, providers="cpu", threads=1))


class FakeDevice(Backend):
    """A sound card stand-in: 'refuse' fails to open; 'vanish' stops asking for blocks after 20 (unplugged
    without a word); 'report' says it is gone after 20 blocks (PortAudio's finished callback)."""
    name = "fake-device"

    def __init__(self, mode: str):
        super().__init__(24000, 256)
        self.mode, self.stopped = mode, False
        self._quit = threading.Event()

    def start(self, render: object) -> None:
        if self.mode == "refuse":
            raise AudioError("cannot open audio device None: Error opening OutputStream: Device unavailable "
                             "[PaErrorCode -9985]; try --device, or --audio null")
        self._render = render
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buf, k = np.zeros(self.blocksize, np.float32), 0
        while not self._quit.is_set():
            if k == 20:
                if self.mode == "report":
                    self.failed = "the output stream stopped (unplugged?)"
                return
            self._block(buf, k * self.blocksize, time.time())
            k += 1
            time.sleep(self.blocksize / self.sample_rate)

    def stop(self) -> None:
        self._quit.set()
        self.stopped = True


def wait_for(predicate: object, timeout: float = 30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("mode", ["refuse", "vanish", "report"])
def test_a_failing_audio_device_falls_back_to_null(synth: Synth, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeDevice(mode)
    engine = Engine(synth, fake, EngineConfig(prerender_default=False, audio_stall_s=0.3))
    try:
        with caplog.at_level(logging.WARNING, logger="pgesam.engine"):
            engine.start()
            assert wait_for(lambda: engine.audio_fallback), "no fallback"
        assert isinstance(engine.backend, NullBackend) and engine.backend.clock is fake.clock  # same timeline
        assert any("falling back to the null backend" in r.getMessage() for r in caplog.records)
        status = Router(engine).dispatch("/pgesam/status", [])[0][1]
        status = dict(zip(status[::2], status[1::2]))
        assert status["audio_fallback"].startswith("fake-device: ") and status["audio"].startswith("null")
        expect = {"refuse": "Device unavailable", "vanish": "no audio block for", "report": "unplugged"}[mode]
        assert expect in status["audio_fallback"]
        blocks = engine.backend.blocks
        assert wait_for(lambda: engine.backend.blocks > blocks + 5)  # the instrument plays on
        engine.note(60, 100)
        assert wait_for(lambda: engine.scheduler.pending == 0)
        assert wait_for(lambda: fake.stopped or mode == "refuse", 5)
    finally:
        engine.close()


def test_without_fallback_a_failing_device_is_an_error(synth: Synth) -> None:
    engine = Engine(synth, FakeDevice("refuse"), EngineConfig(prerender_default=False, audio_fallback=False))
    with pytest.raises(AudioError, match="Device unavailable"):
        engine.start()
    engine.close()


def test_sigterm_stops_serve_cleanly_with_a_valid_recording(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    wav = tmp_path / "performance.wav"
    proc, port = spawn_serve(tiny_bundle, tmp_path / "serve.log", "--audio", f"file:{wav}")
    c = udp_socket()
    try:
        assert ask_raw(c, ("127.0.0.1", port), "/pgesam/ping", expect="/pgesam/pong", timeout=30)
        ask_raw(c, ("127.0.0.1", port), "/pgesam/note", 60, 120, timeout=0.3)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, log
    assert "stopped; underruns" in out and "Traceback" not in log and "threads still running" not in log
    audio, sr = soundfile.read(str(wav), dtype="float32")  # the header was finished: the file is whole
    assert sr == 24000 and len(audio) >= 0.5 * sr and len(audio) % 256 == 0
    assert soundfile.info(str(wav)).frames == len(audio)


def fake_cuda_sessions(monkeypatch: pytest.MonkeyPatch, fail: bool) -> list:
    """Make the bundle ask for CUDA (as 'auto' does where CUDA loads) and make CUDA sessions fail (`fail`) or
    quietly run on CPU (onnxruntime-gpu's own fallback)."""
    real, calls = bundle_mod.ort.InferenceSession, []

    def session(path: str, options: object = None, providers: list | None = None, **kw: object) -> object:
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        calls.append(names)
        if "CUDAExecutionProvider" in names:
            if fail:
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device "
                                   "is detected\nmore detail")
            providers = ["CPUExecutionProvider"]
        return real(path, options, providers=providers, **kw)

    monkeypatch.setattr(bundle_mod, "resolve_providers",
                        lambda requested=None: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(bundle_mod.ort, "InferenceSession", session)
    return calls


@pytest.mark.parametrize("fail", [True, False])
def test_cuda_failing_falls_back_to_cpu_and_status_says_so(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                           fail: bool) -> None:
    calls = fake_cuda_sessions(monkeypatch, fail)
    b = Bundle(tiny_bundle, providers="auto", threads=1)
    assert b.provider == "CPUExecutionProvider" and b.device == "cpu"
    assert all(p == ["CPUExecutionProvider"] for p in b.providers.values())
    if fail:
        assert b.fallback.startswith("the CUDA provider failed on transformer_encoder.onnx")
        assert "no CUDA-capable device" in b.fallback and calls[1:] and all(c == ["CPUExecutionProvider"]
                                                                            for c in calls[1:])
    else:
        assert b.fallback == "CUDA was asked for but onnxruntime runs transformer_encoder.onnx on CPU"
    engine = Engine(Synth(b), NullBackend(24000, 256), EngineConfig(prerender_default=False))
    [(address, flat)] = Router(engine).dispatch("/pgesam/status", [])
    status = dict(zip(flat[::2], flat[1::2]))
    assert status["provider"] == "CPUExecutionProvider" and status["provider_fallback"] == b.fallback
    engine.close()


def run_serve(tiny: Path, *args: str) -> object:
    return CliRunner().invoke(cli, ["serve", "--bundle", str(tiny), "--provider", "cpu", "--threads", "1",
                                    "--port", "0", "--duration", "0.3", *args])


def test_serve_refuses_remote_binding_without_the_flag(tiny_bundle: Path) -> None:  # noqa: F811
    r = run_serve(tiny_bundle, "--host", "0.0.0.0", "--audio", "null")
    assert r.exit_code == 1 and "refusing to listen on 0.0.0.0" in r.output and "--allow-remote" in r.output
    r = run_serve(tiny_bundle, "--host", "0.0.0.0", "--allow-remote", "--allow", "127.0.0.1,127.0.0.3",
                  "--audio", "null")
    assert r.exit_code == 0, r.output
    assert "warning: listening on 0.0.0.0" in r.output and "127.0.0.1/32, 127.0.0.3/32" in r.output
    r = run_serve(tiny_bundle, "--allow", "not an address!", "--audio", "null")
    assert r.exit_code == 1 and "--allow: 'not an address!'" in r.output


@pytest.mark.skipif("no audio devices" not in list_devices(), reason="this machine has a sound device")
def test_serve_without_a_sound_device_plays_on_null(tiny_bundle: Path) -> None:  # noqa: F811
    r = run_serve(tiny_bundle, "--audio", "sounddevice")
    assert r.exit_code == 0, r.output
    assert "warning: audio" in r.output and "null backend" in r.output and "audio null" in r.output
    r = run_serve(tiny_bundle, "--audio", "sounddevice", "--no-audio-fallback")
    assert r.exit_code == 1 and "Error:" in r.output


def test_serve_status_reports_the_limits(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    proc, port = spawn_serve(tiny_bundle, tmp_path / "serve.log", "--audio", "null", "--out-dir", str(tmp_path))
    c = udp_socket()
    try:
        status = status_of(ask_raw(c, ("127.0.0.1", port), "/pgesam/status", expect="/pgesam/status", timeout=30))
        assert status["allow"] == "any" and status["max_pending"] == 4096 and status["max_streams"] == 16
        assert {"kernel_dropped", "denied", "errors_suppressed", "dropped_events", "dropped_streams",
                "slow_dropped", "underruns", "audio_fallback", "provider_fallback", "rss_mb"} <= set(status)
        [(a, (text,))] = ask_raw(c, ("127.0.0.1", port), "/pgesam/render", 0.0, 0.0, 60, "/etc/x.wav",
                                 expect="/pgesam/error", timeout=30)
        assert "outside the allowed folder" in text
    finally:
        c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
