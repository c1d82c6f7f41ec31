"""The `pgesam` CLI on the fixture bundle: render (single, grid, batch), encode, info, bench, and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile
from click.testing import CliRunner
from engine_fixtures import dominant_hz, f0_of, tiny_bundle  # noqa: F401 (pytest fixture)

from pgesam_engine import bundle as bundle_mod
from pgesam_engine.cli import cli


def run(*args: str, ok: bool = True) -> object:
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_render_one_note(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "note.wav"
    run("render", "--bundle", str(tiny_bundle), "--x", "-1", "--y", "-1", "--pitch", "62", "-o", str(out))
    audio, sr = soundfile.read(str(out))
    assert sr == 24000 and len(audio) == 96000
    assert dominant_hz(audio[:24000]) == pytest.approx(f0_of(62), rel=0.005)


def test_render_grid_and_batch(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    run("render", "--bundle", str(tiny_bundle), "--grid", "-o", str(tmp_path / "grid"))
    assert sorted(p.name for p in (tmp_path / "grid").iterdir())[:2] == ["pitch_48.wav", "pitch_49.wav"]
    assert len(list((tmp_path / "grid").iterdir())) == 25
    csv = tmp_path / "notes.csv"
    csv.write_text(f"x,y,pitch,velocity,path\n0.1,0.2,50,127,{tmp_path / 'a.wav'}\n-0.3,0.1,70,64,\n")
    run("render", "--bundle", str(tiny_bundle), "--batch", str(csv), "-o", str(tmp_path / "batch"))
    loud = soundfile.read(str(tmp_path / "a.wav"))[0]
    soft = soundfile.read(str(tmp_path / "batch" / "note_0001_70.wav"))[0]
    assert abs(soft).max() < 0.5 * abs(loud).max()  # velocity 64 is about -12 dB


def test_render_errors_are_one_line_with_nonzero_exit(tiny_bundle: Path, tmp_path: Path,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    r = run("render", "--bundle", str(tiny_bundle), "--pitch", "99", "-o", str(tmp_path / "x.wav"), ok=False)
    assert r.exit_code == 1 and "Error: MIDI pitch 99 is outside this model's range 48-72" in r.output
    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE", tmp_path / "none")
    r = run("render", "-o", str(tmp_path / "x.wav"), ok=False)
    assert r.exit_code == 1 and "pass --bundle PATH or run `pgesam-train export`" in r.output
    r = run("render", "--bundle", str(tmp_path), ok=False)
    assert r.exit_code == 1 and "has no manifest.json" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = run("render", "--bundle", str(tiny_bundle), "--batch", str(bad), ok=False)
    assert r.exit_code == 1 and "at least x,y,pitch" in r.output


def test_encode_and_info(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    note = tmp_path / "n.wav"
    run("render", "--bundle", str(tiny_bundle), "--x", "-1", "--y", "-1", "--pitch", "58", "-o", str(note))
    r = run("encode", "--bundle", str(tiny_bundle), str(note))
    assert "pitch 58" in r.output and "keyboard_acoustic_000" in r.output
    r = run("info", "--bundle", str(tiny_bundle), "--provider", "cpu")
    assert "decoder_step           CPUExecutionProvider" in r.output and "audio devices" in r.output
    r = run("serve", "--bundle", str(tiny_bundle), "--audio", "bogus", ok=False)
    assert r.exit_code == 1 and "unknown audio backend 'bogus'" in r.output


def test_bench_json_has_every_figure(tiny_bundle: Path) -> None:  # noqa: F811
    r = run("bench", "--bundle", str(tiny_bundle), "--json", "--repeats", "3", "--notes", "10", "--no-torch")
    report = json.loads(r.output[r.output.index("{"):])
    assert {"decoder_step", "codec_decoder", "codec_decoder_stream (8 frames)"} <= set(report["graphs"])
    g, rt = report["generation"], report["realtime"]
    assert {"decoder_step_ms_b1", "decoder_step_ms_b25", "note_rtf", "prerender_s", "stream_first_p50_ms"} <= set(g)
    assert rt["notes"] == 10 and {"note_on_p99_ms", "note_on_jitter_ms", "idle_cpu_percent", "rss_mb"} <= set(rt)
    assert report["command"] == "pgesam bench --json --repeats 3 --notes 10 --no-torch"  # the report prints it
