"""End to end: `pgesam serve --audio file:PATH` driven over loopback UDP with python-osc, like SuperCollider does.

Timetagged bundles 0.6 s apart must come out of the recording 0.6 s apart to the sample, each at its pitch
(the fixture codec is an oscillator), with silence after each note-off's release; an immediate note plays too.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from engine_fixtures import SR, OscClient, dominant_hz, f0_of, onsets, tiny_bundle  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PGESAM = [sys.executable, "-c", "from pgesam_engine.cli import main; main()"]


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:  # noqa: F811
    wav = tmp_path / "performance.wav"
    proc = subprocess.Popen([*PGESAM, "serve", "--bundle", str(tiny_bundle), "--audio", f"file:{wav}",
                             "--port", "0", "--provider", "cpu", "--threads", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    if match is None:
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.stderr.read()}")
    yield proc, int(match.group(1)), wav
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_prerendered(client: OscClient, timeout: float = 60.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = client.status()
        if status["prerendering"] == 0 and status["cache_complete"] >= 1:
            return status
        time.sleep(0.1)
    raise TimeoutError("prerender did not finish")


def test_serve_plays_timed_notes_at_the_right_samples_and_pitches(server: tuple) -> None:
    proc, port, wav = server
    client = OscClient("127.0.0.1", port)
    try:
        client.wait_ready()
        assert client.ask("/pgesam/timbre", -0.7, -0.7) == [("/pgesam/timbre", [pytest.approx(-0.7),
                                                                                pytest.approx(-0.7), 0])]
        wait_prerendered(client)
        t = time.time() + 1.0
        plan = [(60, 0.0), (67, 0.6), (72, 1.2)]
        for pitch, start in plan:
            client.send_bundle(t + start, [("/pgesam/note", [pitch, 127])])
            client.send_bundle(t + start + 0.3, [("/pgesam/note_off", [pitch])])
        time.sleep(max(0.0, t + 1.8 - time.time()))
        client.send("/pgesam/note", 55, 127)  # immediate
        time.sleep(0.3)
        client.send("/pgesam/note_off", 55)
        time.sleep(0.4)
        status = client.status()
        assert status["late"] == 0 and status["audio_errors"] == 0
    finally:
        client.close()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out

    audio, sr = soundfile.read(str(wav), dtype="float32")
    assert sr == SR
    starts = onsets(audio)
    assert len(starts) == 4, starts
    assert np.diff(starts[:3]).tolist() == pytest.approx([0.6 * SR, 0.6 * SR], abs=2)  # sample accurate
    for start, pitch in zip(starts, [60, 67, 72, 55]):
        assert dominant_hz(audio[start:start + SR // 4]) == pytest.approx(f0_of(pitch), rel=0.005)
    for start in starts[:3]:
        released = start + int((0.3 + 0.08) * SR) + 10
        assert np.abs(audio[start + SR // 10:start + SR // 5]).max() > 0.05  # sounding while held
        assert np.abs(audio[released:released + SR // 10]).max() < 1e-3  # silent after the release


def test_serve_reports_a_busy_port_as_one_line(server: tuple, tiny_bundle: Path) -> None:  # noqa: F811
    proc, port, _ = server
    r = subprocess.run([*PGESAM, "serve", "--bundle", str(tiny_bundle), "--audio", "null", "--port", str(port)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error: cannot listen on 127.0.0.1") and len(r.stderr.strip().splitlines()) == 1
