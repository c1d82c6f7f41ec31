"""The ONNX bundle exported from the tiny presets: graphs load, match torch, codec lengths, streaming, static vs
dynamic step, manifest and metadata, refusal of tampered or foreign bundles, and the EnCodec backend.

The tiny chain is built the way training builds it: a tiny stft codec encodes synthetic harmonic notes into a
latent cache (LatentWriter), `train_vae` and `train_transformer` run a few steps on it, and `export_bundle`
writes the bundle. `tiny_export` does this once per test session (test_bundle_integration.py reuses it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import codec_graphs
from export.bundle import export_bundle
from export.check import CODEC_LENGTHS, check_bundle, onnx_decode_stream, onnx_generate, open_sessions
from export.manifest import ExportError, read_manifest
from pgesam_engine.bundle import Bundle, BundleError
from pgesam_train.codec import build_codec, codec_id, codec_preset, save_codec
from pgesam_train.config import transformer_preset, vae_preset
from pgesam_train.data.latents import LatentWriter
from torch_threads import one_thread

GRAPHS = {"transformer_encoder", "decoder_step", "decoder_step_static", "codec_decoder", "codec_decoder_stream",
          "codec_encoder", "vae_encoder"}
# name, family index, family name, harmonic amplitudes: three timbres the VAE can tell apart
INSTRUMENTS = [("keyboard_acoustic_000", 4, "keyboard", (1.0, 0.5, 0.25, 0.1)),
               ("organ_electronic_000", 6, "organ", (1.0, 0.0, 0.8, 0.0)),
               ("flute_acoustic_000", 2, "flute", (1.0, 0.1, 0.02, 0.0))]
PITCHES = (48, 55, 60, 67)
pytestmark = pytest.mark.usefixtures("one_torch_thread")




@dataclass(frozen=True)
class TinyChain:
    codec: Path
    vae: Path
    transformer: Path
    bundle: Path


def note_audio(harmonics: tuple[float, ...], midi: int, sr: int = 24000, seconds: float = 4.0) -> np.ndarray:
    """A decaying harmonic tone (samples,) float32, peak about 0.5."""
    t = np.arange(int(sr * seconds)) / sr
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    x = sum(a * np.sin(2 * np.pi * (k + 1) * f0 * t) for k, a in enumerate(harmonics))
    return (0.5 * x / sum(harmonics) * np.exp(-t / 1.5)).astype(np.float32)


def write_latents(root: Path, codec: torch.nn.Module) -> Path:
    """A latent cache of synthetic notes (train: every instrument x pitch; valid: one instrument) and a
    dataset.json beside it in the format `pgesam-train dataset build` writes (soundfonts and instruments)."""
    dataset, cache = root / "dataset", root / "latents"
    dataset.mkdir(parents=True)
    meta = {"preset": "synthetic", "soundfonts": [{"name": "fluidr3", "licence": "MIT", "origin": "fluidr3",
                                                   "debian_package": "fluid-soundfont-gm"}],
            "instruments": [{"instrument_str": n, "soundfont": "fluidr3", "program": i, "preset_name": f"Preset {i}"}
                            for i, (n, *_) in enumerate(INSTRUMENTS)]}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for split, insts in (("train", INSTRUMENTS), ("valid", INSTRUMENTS[:1])):
        notes = [(i, inst, p) for i, inst in enumerate(insts) for p in PITCHES]
        audio = torch.from_numpy(np.stack([note_audio(inst[3], p) for _, inst, p in notes]))
        with torch.no_grad():
            emb = codec.encode(audio, sample_rate=24000).numpy()  # (N, 128, 300)
        w = LatentWriter(cache, split, codec_id(codec), str(dataset), len(notes), 128, emb.shape[2])
        for k, (i, (name, fam, _, _), p) in enumerate(notes):
            w.put(k, emb[k], {"note_str": f"{name}-{p:03d}-100", "pitch": p, "instrument": i, "instrument_str": name,
                              "family": fam})
        w.close()
    return cache


def build_tiny_chain(root: Path) -> TinyChain:
    """Tiny codec, VAE and Transformer checkpoints trained a few steps, and their exported bundle (with the
    int8 variant). Reuses what an earlier call left in `root`."""
    from pgesam_train.train_transformer import train_transformer
    from pgesam_train.train_vae import train_vae
    done = root / "chain.json"
    if done.is_file():
        return TinyChain(**{k: Path(v) for k, v in json.loads(done.read_text()).items()})
    torch.manual_seed(0)
    codec = build_codec(codec_preset("tiny")).eval()
    codec_ckpt = save_codec(root / "codec.pt", codec)
    cache = write_latents(root, codec)
    vae_ckpt = train_vae(dataclasses.replace(vae_preset("tiny"), epochs=1, batch_size=6), cache, root / "vae",
                         progress=False)
    tf_cfg = dataclasses.replace(transformer_preset("tiny"), steps=2, batch_size=2, val_every=2, val_batches=1)
    tf_ckpt = train_transformer(tf_cfg, cache, vae_ckpt, root / "transformer")
    bundle = export_bundle(codec_ckpt, vae_ckpt, tf_ckpt, root / "bundle", variants=("int8",))
    chain = TinyChain(codec_ckpt, vae_ckpt, tf_ckpt, bundle)
    done.write_text(json.dumps({k: str(v) for k, v in dataclasses.asdict(chain).items()}))
    return chain


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> TinyChain:
    """The tiny chain and its bundle, built once per session (read-only: copy the bundle before changing it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_export"
    root.mkdir(exist_ok=True)
    with one_thread():
        return build_tiny_chain(root)


@pytest.fixture(scope="session")
def tiny_report(tiny_export: TinyChain):
    """`check_bundle` of the tiny bundle, run once."""
    with one_thread():
        return check_bundle(tiny_export.bundle)


def copy_bundle(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ------------------------------------------------------------------------------------------- the bundle
def test_every_graph_loads_and_carries_its_metadata(tiny_export: TinyChain) -> None:
    manifest = read_manifest(tiny_export.bundle)
    assert set(manifest["graphs"]) == GRAPHS | {"decoder_step.int8"}
    assert manifest["codec_stream"]["tail_state"] == "istft_overlap"  # stft: the streamed decode can be completed
    for key, entry in manifest["graphs"].items():
        sess = ort.InferenceSession(str(tiny_export.bundle / entry["file"]), providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        assert meta["pgesam_format"] == "pgesam-bundle" and meta["pgesam_version"] == "2"
        assert meta["graph"] == key.split(".")[0]
        assert (meta["sample_rate"], meta["frames"], meta["pitch_min"], meta["pitch_max"]) == ("24000", "300", "48",
                                                                                                 "72")
        assert set(entry["inputs"]) == {i.name for i in sess.get_inputs()}
        if meta["graph"] in ("transformer_encoder", "decoder_step", "decoder_step_static"):
            assert meta["kv_layout"] == "batch,heads,length,head_dim"
            assert meta["kv_cross"] == ",".join(manifest["kv_cache"]["cross"])
    step = manifest["graphs"]["decoder_step"]
    caches = [f"{kv}{i}" for i in range(2) for kv in "kv"]  # tiny preset: 2 decoder layers
    assert list(step["inputs"]) == ["frame", "position", *(f"cross_{c}" for c in caches),
                                    *(f"in_self_{c}" for c in caches)]
    assert list(step["outputs"]) == ["next_frame", *(f"out_self_{c}" for c in caches)]
    assert step["inputs"]["in_self_k0"] == ["B", 2, "P", 16] and step["outputs"]["out_self_v1"] == ["B", 2, "P1", 16]
    assert step["inputs"]["cross_k1"] == ["B", 2, 3, 16] and step["inputs"]["position"] == []
    encoder = manifest["graphs"]["transformer_encoder"]
    assert list(encoder["outputs"]) == ["memory", *(f"cross_{c}" for c in caches)]
    static = manifest["graphs"]["decoder_step_static"]
    assert static["inputs"]["in_self_v0"] == ["B", 2, 300, 16] and static["inputs"]["position"] == [1]
    ops = {n.op_type for n in onnx.load(str(tiny_export.bundle / static["file"])).graph.node}
    assert not ops & {"If", "Loop", "Scan"}, "the static step must have no data-dependent control flow"
    measured = manifest["graphs"]["decoder_step.int8"]["measured"]
    assert 0 < measured["max_abs_error"] < 0.5 and measured["ms_per_call"] > 0


def test_manifest_describes_the_models_and_their_origin(tiny_export: TinyChain) -> None:
    m = read_manifest(tiny_export.bundle)
    tf = m["configs"]["transformer"]
    caches = [f"{kv}{i}" for i in range(tf["n_decoder_layers"]) for kv in "kv"]
    assert m["kv_cache"] == {"layers": tf["n_decoder_layers"], "heads": tf["n_heads"],
                             "head_dim": tf["d_model"] // tf["n_heads"], "encoder_length": 3, "max_length": 300,
                             "layout": ["batch", "heads", "length", "head_dim"],
                             "cross": [f"cross_{c}" for c in caches],
                             "self": [[f"in_self_{c}", f"out_self_{c}"] for c in caches]}
    assert (m["hop"], m["dim"], m["frame_rate"]) == (320, 128, 75.0)
    assert m["codec_stream"]["latency_samples"] == 960 and m["codec_stream"]["min_first_frames"] == 1
    assert [s["name"] for s in m["codec_stream"]["state"]] == ["conv_in", "block0", "phase", "istft_overlap"]
    insts = {i["name"]: i for i in m["map"]["instruments"]}
    assert set(insts) == {name for name, *_ in INSTRUMENTS}
    organ = insts["organ_electronic_000"]
    assert (organ["family"], organ["soundfont"], organ["program"]) == ("organ", "fluidr3", 1)
    for inst in insts.values():
        assert m["map"]["bounds"]["x"][0] <= inst["x"] <= m["map"]["bounds"]["x"][1]
        assert math.hypot(inst["x"], inst["y"]) <= m["map"]["radius"] + 1e-9
    assert m["data"]["licences"] == [{"soundfont": "fluidr3", "licence": "MIT", "origin": "fluidr3",
                                      "debian_package": "fluid-soundfont-gm"}]
    assert m["codec"]["backend"] == "stft" and len(m["codec"]["weights"]) == 64
    from pgesam_train.checkpoint import file_sha256
    assert m["sources"]["transformer"]["sha256"] == file_sha256(tiny_export.transformer)


def test_every_graph_matches_torch(tiny_report) -> None:
    failed = [r for r in tiny_report.rows if not r.ok]
    assert not failed, tiny_report.table()
    for graph in GRAPHS:
        assert tiny_report.worst(graph) <= 1e-4, graph
    cases = " ".join(r.case for r in tiny_report.rows if r.graph == "codec_decoder")
    assert all(f"T={t} " in cases + " " for t in CODEC_LENGTHS)
    note = next(r for r in tiny_report.rows if r.graph == "note" and "torch render (embeddings)" in r.case)
    assert note.max_abs_error <= 1e-3 and note.scale > 0.1  # a real note, not silence


def test_streaming_decode_equals_whole_decode(tiny_export: TinyChain) -> None:
    manifest = read_manifest(tiny_export.bundle)
    s = open_sessions(tiny_export.bundle, manifest)
    emb = np.random.default_rng(0).standard_normal((2, 128, 75)).astype(np.float32)
    streamed = onnx_decode_stream(s["codec_decoder_stream"], manifest["codec_stream"]["state"], emb, [2, 1, 5, 8, 59])
    full = s["codec_decoder"].run(None, {"emb": emb})[0]
    lat = manifest["codec_stream"]["latency_samples"]
    assert streamed.shape == full.shape == (2, 75 * 320)
    np.testing.assert_allclose(streamed[:, lat:], full[:, :-lat], atol=1e-5)


def test_static_step_equals_dynamic_step_over_a_whole_note(tiny_export: TinyChain) -> None:
    s = open_sessions(tiny_export.bundle, read_manifest(tiny_export.bundle))
    z, pidx = np.array([[0.6, -0.1], [-0.5, 0.4]], np.float32), np.array([0, 12], np.int64)
    kv = read_manifest(tiny_export.bundle)["kv_cache"]
    dynamic = onnx_generate(s, kv, z, pidx, 300)
    static = onnx_generate(s, kv, z, pidx, 300, static=True)
    assert dynamic.shape == (2, 128, 300) and np.abs(dynamic).max() > 0.1
    np.testing.assert_allclose(static, dynamic, atol=1e-4)


# ------------------------------------------------------------------------------------------- refusals
def test_tampered_file_is_refused_by_the_engine(tiny_export: TinyChain, tmp_path: Path) -> None:
    b = copy_bundle(tiny_export.bundle, tmp_path / "b")
    Bundle(b, providers="cpu", threads=1)  # the untouched copy opens
    data = bytearray((b / "decoder_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder_step\.onnx does not match its SHA-256"):
        Bundle(b, providers="cpu")


def test_wrong_version_is_refused(tiny_export: TinyChain, tmp_path: Path) -> None:
    b = copy_bundle(tiny_export.bundle, tmp_path / "b")
    raw = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**raw, "version": 1}))  # the stacked-cache format
    with pytest.raises(BundleError, match="bundle version 1 is not one this engine reads"):
        Bundle(b, providers="cpu")
    with pytest.raises(ExportError, match="version 1"):
        read_manifest(b)
    # a graph of another version, its hash updated in the manifest: refused by its own metadata
    from export.manifest import graph_entry, set_metadata
    set_metadata(b / "codec_decoder.onnx", {"pgesam_version": "1"})
    raw["graphs"]["codec_decoder"] = graph_entry(b, "codec_decoder.onnx")
    (b / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="codec_decoder.onnx is bundle version 1"):
        Bundle(b, providers="cpu")


def test_export_never_leaves_a_half_written_bundle(tiny_export: TinyChain, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from export import bundle as bundle_mod
    out = copy_bundle(tiny_export.bundle, tmp_path / "bundle")
    before = (out / "manifest.json").read_bytes()

    def broken(*_: object) -> dict:
        raise RuntimeError("disk full")
    monkeypatch.setattr(bundle_mod.quantize, "write_variant", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(tiny_export.codec, tiny_export.vae, tiny_export.transformer, out, variants=("int8",))
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle; refusing to replace it"):
        export_bundle(tiny_export.codec, tiny_export.vae, tiny_export.transformer, tmp_path / "notes")


# ------------------------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def encodec_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    codec = build_codec(dataclasses.replace(codec_preset("tiny", "encodec"), encodec_n_filters=2)).eval()
    return save_codec(tmp_path_factory.mktemp("encodec") / "encodec.pt", codec)


def test_fp16_storage_keeps_the_int8_variant_quantised(tiny_export: TinyChain, tmp_path: Path) -> None:
    """The int8 variant is quantised from the float32 graph: quantising the fp16-stored graph (weights behind
    Cast nodes) would silently leave every matrix product in float32."""
    with one_thread():
        out = export_bundle(tiny_export.codec, tiny_export.vae, tiny_export.transformer, tmp_path / "b",
                            variants=("int8",), weights="fp16")
    manifest = read_manifest(out)
    int8 = onnx.load(str(out / manifest["graphs"]["decoder_step.int8"]["file"]))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in int8.graph.node)
    base = onnx.load(str(out / manifest["graphs"]["decoder_step"]["file"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in base.graph.initializer)
    assert "variant_of" in manifest["graphs"]["decoder_step.int8"]
    Bundle(out, providers="cpu", threads=1, variant="int8")  # hashes of the rewritten graphs verify


def test_codec_of_other_frames_is_refused(tiny_export: TinyChain, encodec_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="trained on frames of codec mel-.*--allow-mismatch"):
        export_bundle(encodec_ckpt, tiny_export.vae, tiny_export.transformer, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_encodec_backend_exports_to_the_same_contract(tiny_export: TinyChain, encodec_ckpt: Path,
                                                      tmp_path: Path) -> None:
    from pgesam_train.codec import load_codec
    out = export_bundle(encodec_ckpt, tiny_export.vae, tiny_export.transformer, tmp_path / "b", allow_mismatch=True,
                        static=False)
    b = Bundle(out, providers="cpu", threads=1)
    assert set(b.sessions) == GRAPHS - {"decoder_step_static"}
    m = read_manifest(out)
    assert m["codec"]["backend"] == "encodec" and m["codec_stream"]["min_first_frames"] == 7
    assert m["codec_stream"]["latency_samples"] == 0 and m["codec_stream"]["state"][0]["name"] == "started"
    codec = load_codec(encodec_ckpt)
    emb = codec_graphs.example_frames(codec, 1, 20, seed=5)
    full = b.session("codec_decoder").run(None, {"emb": emb.numpy()})[0]
    for t in (7, 8):
        with torch.no_grad():
            ref = codec.decode(emb[:, :, :t]).numpy()
        np.testing.assert_allclose(b.session("codec_decoder").run(None, {"emb": emb[:, :, :t].numpy()})[0], ref,
                                   atol=1e-4)
    streamed = onnx_decode_stream(b.session("codec_decoder_stream"), m["codec_stream"]["state"], emb.numpy(),
                                  [7, 1, 1, 3, 8])
    np.testing.assert_allclose(streamed, full, atol=1e-5)


def test_refined_stft_codec_streams_and_pipelines_in_the_engine(tiny_export: TinyChain, tmp_path: Path) -> None:
    """Phase refinement moves the rest of a streamed note into the stream graph's `tail` output: the engine's
    pipelined render and its streamed note must both still equal the whole-note decode."""
    from pgesam_engine.synth import Synth
    torch.manual_seed(0)
    codec = build_codec(dataclasses.replace(codec_preset("tiny"), refine_iters=1)).eval()
    ckpt = save_codec(tmp_path / "refined.pt", codec)  # the same log-mel encoder: the tiny chain's latents fit
    out = export_bundle(ckpt, tiny_export.vae, tiny_export.transformer, tmp_path / "b", static=False)
    m = read_manifest(out)["codec_stream"]
    assert m["tail_output"] == "tail" and "tail_state" not in m and m["latency_samples"] == 960 + 3 * 320
    synth = Synth(Bundle(out, providers="cpu", threads=1))
    assert synth.m.stream_tail == "tail" and synth.pipelines(300)
    points, pitches = np.array([[0.2, -0.1], [-0.5, 0.3]], np.float32), np.array([55, 67])
    whole = synth.decode(synth.generate(points, pitches))
    np.testing.assert_allclose(synth.render(points, pitches), whole, atol=1e-4)  # pipelined, tail appended
    streamed = np.concatenate(list(synth.stream(points[0], int(pitches[0]), chunk=8)))
    np.testing.assert_allclose(streamed, whole[0], atol=1e-4)


def test_griffinlim_has_no_onnx_form() -> None:
    codec = build_codec(codec_preset("tiny", "griffinlim"))
    with pytest.raises(ExportError, match="griffinlim codec cannot be exported.*iterative phase search"):
        codec_graphs.codec_specs(codec)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_exports_with_defaults_from_the_transformer(tiny_export: TinyChain, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pgesam_train.cli import main
    result = CliRunner().invoke(main, ["export", "--transformer", str(tiny_export.transformer), "--codec",
                                       str(tiny_export.codec), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "decoder_step.onnx" in result.output and "codec_decoder_stream.onnx" in result.output
    m = read_manifest(tmp_path / "b")
    assert m["sources"]["vae"]["path"] == str(tiny_export.vae.resolve())  # the VAE the Transformer was trained with
    result = CliRunner().invoke(main, ["export", "--check", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "has no manifest.json" in str(result.exception or result.output)


def test_engine_streams_an_encodec_bundle_from_a_long_enough_first_chunk(tiny_export: TinyChain, encodec_ckpt: Path,
                                                                         tmp_path: Path) -> None:
    from pgesam_engine.synth import Synth
    out = export_bundle(encodec_ckpt, tiny_export.vae, tiny_export.transformer, tmp_path / "b", allow_mismatch=True,
                        static=False)
    synth = Synth(Bundle(out, providers="cpu", threads=1))
    assert synth.m.stream_min_first_frames == 7
    chunks = list(synth.stream((0.1, 0.2), 60, chunk=8, n_frames=30))
    assert len(chunks[0]) // synth.m.hop >= 7  # EnCodec's reflect padding needs 7 frames before the first output
    whole = synth.decode(synth.generate([[0.1, 0.2]], [60], n_frames=30))[0]
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-4)
