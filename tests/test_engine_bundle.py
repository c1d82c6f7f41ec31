"""Bundle loading and verification: good bundles open, tampered or foreign ones are refused with clear messages."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from engine_fixtures import build_bundle, tiny_bundle  # noqa: F401 (pytest fixture)

from pgesam_engine import bundle as bundle_mod
from pgesam_engine.bundle import Bundle, BundleError, default_bundle_path, resolve_providers


@pytest.fixture
def copy(tiny_bundle: Path, tmp_path: Path) -> Path:  # noqa: F811
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def edit_manifest(root: Path, **changes: object) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_bundle_opens_every_graph_and_reports_providers(tiny_bundle: Path) -> None:  # noqa: F811
    b = Bundle(tiny_bundle, providers="cpu", threads=1)
    assert set(b.sessions) == {"transformer_encoder", "decoder_step", "decoder_step_static", "codec_decoder",
                               "codec_decoder_stream", "codec_encoder", "vae_encoder"}
    assert all(p == ["CPUExecutionProvider"] for p in b.providers.values())
    assert b.device == "cpu" and b.provider == "CPUExecutionProvider"
    m = b.manifest
    assert (m.sample_rate, m.hop, m.frames, m.pitch_min, m.pitch_max, m.n_pitches) == (24000, 320, 300, 48, 72, 25)
    assert m.kv.self_shape(3, 0) == (2, 2, 3, 2, 0, 8)
    assert m.stream_state == (("phase", (1, 1)),)


def test_tampered_graph_is_refused_naming_the_file(copy: Path) -> None:
    data = bytearray((copy / "decoder_step.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (copy / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder_step\.onnx does not match its SHA-256"):
        Bundle(copy)


def test_truncated_graph_is_refused(copy: Path) -> None:
    data = (copy / "codec_decoder.onnx").read_bytes()
    (copy / "codec_decoder.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=r"codec_decoder\.onnx is .* bytes, the manifest says"):
        Bundle(copy)


def test_unknown_version_is_refused(copy: Path) -> None:
    edit_manifest(copy, version=1)  # the stacked-cache layout this engine no longer reads
    with pytest.raises(BundleError, match="bundle version 1 is not one this engine reads"):
        Bundle(copy)
    edit_manifest(copy, version=3)
    with pytest.raises(BundleError, match="bundle version 3 is not one this engine reads"):
        Bundle(copy)


def test_stream_tail_must_name_a_stream_state(copy: Path) -> None:
    stream = json.loads((copy / "manifest.json").read_text())["codec_stream"]
    edit_manifest(copy, codec_stream={**stream, "tail_state": "no_such_state"})
    with pytest.raises(BundleError, match="tail_state 'no_such_state' is not one of its stream states"):
        Bundle(copy)


def test_wrong_format_and_missing_manifest(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="has no manifest.json"):
        Bundle(tmp_path)
    edit_manifest(copy, format="something-else")
    with pytest.raises(BundleError, match="format is 'something-else'"):
        Bundle(copy)


def test_missing_required_graph_file(copy: Path) -> None:
    (copy / "transformer_encoder.onnx").unlink()
    with pytest.raises(BundleError, match="has no transformer_encoder.onnx"):
        Bundle(copy)


def test_graph_metadata_must_agree_with_the_manifest(copy: Path) -> None:
    """A graph re-exported with another version is caught even when the manifest hash was updated."""
    model = onnx.load(str(copy / "vae_encoder.onnx"))
    for p in model.metadata_props:
        if p.key == "pgesam_version":
            p.value = "7"
    data = model.SerializeToString()
    (copy / "vae_encoder.onnx").write_bytes(data)
    m = json.loads((copy / "manifest.json").read_text())
    m["graphs"]["vae_encoder"].update(sha256=bundle_mod.sha256_of(copy / "vae_encoder.onnx"), bytes=len(data))
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="vae_encoder.onnx is bundle version 7"):
        Bundle(copy)


def test_optional_graphs_may_be_absent(tmp_path: Path) -> None:
    root = build_bundle(tmp_path / "nostatic", frames=20, with_static=False)
    b = Bundle(root, providers="cpu")
    assert not b.has("decoder_step_static")
    with pytest.raises(BundleError, match="has no decoder_step_static graph"):
        b.session("decoder_step_static")


def test_provider_requests() -> None:
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    with pytest.raises(BundleError, match="has no NopeExecutionProvider"):
        resolve_providers("NopeExecutionProvider")


def test_cuda_is_asked_for_only_when_its_libraries_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgesam_engine import bundle as bundle_module
    reason = bundle_module.cuda_unusable_reason()
    assert ("CUDAExecutionProvider" in resolve_providers(None)) == (reason is None)
    monkeypatch.setattr(bundle_module, "cuda_unusable_reason", lambda: "CUDA libraries missing (libcublasLt)")
    monkeypatch.setattr(bundle_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="cannot run here: CUDA libraries missing"):
        resolve_providers("cuda")


def test_default_bundle_error_tells_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE", tmp_path / "none")
    with pytest.raises(BundleError, match="pass --bundle PATH or run `pgesam-train export`"):
        default_bundle_path()


def test_engine_never_imports_torch() -> None:
    code = ("import sys\nimport pgesam_engine.cli, pgesam_engine.bench, pgesam_engine.osc\n"
            "assert 'torch' not in sys.modules, 'pgesam_engine imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
