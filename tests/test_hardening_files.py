"""Files: atomic WAV writes (a killed render leaves no partial file) and bundles refused at load, each with a
message that names the file and the problem."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile
from click.testing import CliRunner
from engine_fixtures import PGESAM, REPO, tiny_bundle  # noqa: F401 (pytest fixture)

from pgesam_engine import audio as audio_mod
from pgesam_engine.bundle import Bundle, BundleError
from pgesam_engine.cli import cli
from pgesam_engine.hashing import sha256_of

NOTE = 96000  # samples of one fixture note


# ------------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_leaves_the_old_file_or_the_whole_new_one(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "n.wav"
    audio_mod.write_wav_atomic(target, np.zeros(100, np.float32), 24000)
    assert soundfile.info(str(target)).frames == 100 and oct(target.stat().st_mode & 0o777) != "0o600"

    def broken(f: object, data: np.ndarray, *args: object, **kwargs: object) -> None:
        f.write(b"RIFF\0\0\0\0WAVE partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(soundfile, "write", broken)
    with pytest.raises(OSError, match="No space left"):
        audio_mod.write_wav_atomic(target, np.ones(500, np.float32), 24000)
    assert soundfile.info(str(target)).frames == 100  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.wav"]  # and no temporary is left


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.wav"
    elsewhere.write_bytes(b"keep me")
    (tmp_path / "link.wav").symlink_to(elsewhere)
    audio_mod.write_wav_atomic(tmp_path / "link.wav", np.zeros(10, np.float32), 24000)
    assert elsewhere.read_bytes() == b"keep me" and not (tmp_path / "link.wav").is_symlink()


def complete_wavs(folder: Path) -> tuple[int, list[str]]:
    """(whole notes under their final names, names of any partial or unreadable final-named WAVs)."""
    whole, partial = 0, []
    for p in folder.glob("pitch_*.wav"):
        try:
            audio, sr = soundfile.read(str(p), dtype="float32")
            assert sr == 24000 and len(audio) == NOTE and np.abs(audio).max() > 0.01
            whole += 1
        except Exception:
            partial.append(p.name)
    return whole, partial


@pytest.mark.parametrize("kill_when", ["first temporary", "first whole file"])
def test_a_render_killed_midway_leaves_only_whole_files(tiny_bundle: Path, tmp_path: Path,  # noqa: F811
                                                        kill_when: str) -> None:
    """SIGKILL `pgesam render --grid` while it writes its notes: as its first temporary file appears (inside a
    write), or as its first note is in place (between writes)."""
    out = tmp_path / "grid"
    proc = subprocess.Popen([*PGESAM, "render", "--bundle", str(tiny_bundle), "--grid", "-o", str(out),
                             "--provider", "cpu", "--threads", "1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        pattern = ".*.part" if kill_when == "first temporary" else "pitch_*.wav"
        while time.time() < end and proc.poll() is None and not list(out.glob(pattern)):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    whole, partial = complete_wavs(out)
    assert partial == [], f"partial WAVs under their final names: {partial}"
    assert whole <= 25
    print(f"\nrender killed at its {kill_when}: {whole} whole notes, {len(list(out.glob('.*.part')))} temporary files, no partial WAV")


# ------------------------------------------------------------------------------------------------ bundles
@pytest.fixture
def copy(tiny_bundle: Path, tmp_path: Path) -> Path:  # noqa: F811
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b")).resolve()


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def rewrite(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def refused(root: Path, *fragments: str) -> str:
    """Bundle(root) must fail; its message must name every fragment (a path, the problem)."""
    with pytest.raises(BundleError) as info:
        Bundle(root, providers="cpu", threads=1)
    text = str(info.value)
    for f in fragments:
        assert f in text, (f, text)
    return text


def test_truncated_manifest(copy: Path) -> None:
    data = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(data[:len(data) // 2])
    refused(copy, str(copy / "manifest.json"), "is not valid JSON", "truncated or corrupt")


def test_binary_garbage_manifest(copy: Path) -> None:
    (copy / "manifest.json").write_bytes(bytes(range(256)) * 4)
    refused(copy, str(copy / "manifest.json"), "is not text")


def test_manifest_that_is_not_an_object(copy: Path) -> None:
    (copy / "manifest.json").write_text("[1, 2, 3]")
    refused(copy, str(copy / "manifest.json"), "JSON list, not an object")


def test_manifest_field_missing_or_of_the_wrong_type(copy: Path) -> None:
    m = manifest(copy)
    good = dict(m)
    del m["hop"]
    rewrite(copy, m)
    refused(copy, str(copy / "manifest.json"), "has no 'hop'")
    m = dict(good, sample_rate="fast")
    rewrite(copy, m)
    refused(copy, str(copy / "manifest.json"), "wrong type or shape", "'fast'")
    m = dict(good, map={"bounds": {"x": 3}})
    rewrite(copy, m)
    refused(copy, str(copy / "manifest.json"), "wrong type or shape")
    m = dict(good, graphs=["decoder_step.onnx"])
    rewrite(copy, m)
    refused(copy, str(copy / "manifest.json"), "'graphs' must map graph names to objects")


def test_version_mismatch_names_the_manifest(copy: Path) -> None:
    rewrite(copy, dict(manifest(copy), version=999))
    refused(copy, str(copy / "manifest.json"), "bundle version 999 is not one this engine reads")


def test_tampered_graph_names_its_path(copy: Path) -> None:
    f = copy / "codec_decoder.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    refused(copy, str(f), "does not match its SHA-256", "tampered or corrupt")


def test_empty_graph_file(copy: Path) -> None:
    (copy / "decoder_step.onnx").write_bytes(b"")
    refused(copy, str(copy / "decoder_step.onnx"), "is 0 bytes, the manifest says")


def test_graph_missing_its_hash(copy: Path) -> None:
    m = manifest(copy)
    del m["graphs"]["vae_encoder"]["sha256"]
    rewrite(copy, m)
    refused(copy, "manifest graph vae_encoder has no 'sha256'")


def test_graph_path_outside_the_bundle_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.copy(copy / "codec_encoder.onnx", tmp_path / "foreign.onnx")
    m = manifest(copy)
    m["graphs"]["codec_encoder"]["file"] = "../foreign.onnx"
    rewrite(copy, m)
    refused(copy, str(copy / "manifest.json"), "'../foreign.onnx', outside the bundle folder")
    m["graphs"]["codec_encoder"]["file"] = str(tmp_path / "foreign.onnx")
    rewrite(copy, m)
    refused(copy, "outside the bundle folder")


def test_corrupt_graph_with_a_matching_hash(copy: Path) -> None:
    """Garbage that someone re-hashed: onnxruntime refuses it, and the message names the file."""
    f = copy / "codec_decoder_stream.onnx"
    f.write_bytes(b"\x08\x07" + bytes(200))
    m = manifest(copy)
    m["graphs"]["codec_decoder_stream"].update(sha256=sha256_of(f), bytes=f.stat().st_size)
    rewrite(copy, m)
    refused(copy, f"onnxruntime cannot load {f}")


def test_graph_metadata_disagreeing_with_the_manifest(copy: Path) -> None:
    f = copy / "codec_encoder.onnx"
    model = onnx.load(str(f))
    for p in model.metadata_props:
        if p.key == "sample_rate":
            p.value = "16000"
    f.write_bytes(model.SerializeToString())
    m = manifest(copy)
    m["graphs"]["codec_encoder"].update(sha256=sha256_of(f), bytes=f.stat().st_size)
    rewrite(copy, m)
    refused(copy, str(f), "says sample_rate=16000 but manifest.json says 24000")


def test_cli_reports_a_corrupt_bundle_in_one_line(copy: Path, tmp_path: Path) -> None:
    (copy / "manifest.json").write_text('{"format": "pgesam-bundle", "vers')
    r = CliRunner().invoke(cli, ["render", "--bundle", str(copy), "-o", str(tmp_path / "x.wav")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {copy / 'manifest.json'} is not valid JSON")
