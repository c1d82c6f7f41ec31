"""The engine (pgesam_engine, onnxruntime only) on the bundle exported from the tiny torch models: it must
generate the notes pgesam_train.generate generates, render the audio the torch reference render makes, stream
the same audio, place audio on the VAE's map, and `pgesam-train export --check` must pass on the bundle."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from test_export import TinyChain, note_audio, tiny_export  # noqa: F401 (pytest fixture)

from pgesam_engine.bundle import Bundle
from pgesam_engine.synth import Synth
from pgesam_train.codec import load_codec
from pgesam_train.generate import generate
from pgesam_train.render import render_notes
from pgesam_train.transformer import load_transformer
from pgesam_train.vae import load_vae

POINTS = np.array([[0.6, -0.1], [-0.3, 0.5], [0.0, 0.0]], np.float32)
PITCHES = np.array([48, 60, 72])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tiny_export: TinyChain) -> Synth:  # noqa: F811
    return Synth(Bundle(tiny_export.bundle, providers="cpu", threads=1), step_mode="dynamic")


@pytest.fixture(scope="module")
def torch_frames(tiny_export: TinyChain) -> np.ndarray:  # noqa: F811
    model, _ = load_transformer(tiny_export.transformer)
    return generate(model, POINTS[:, 0].tolist(), POINTS[:, 1].tolist(), PITCHES.tolist()).numpy()


def test_engine_generates_the_notes_of_pgesam_train_generate(synth: Synth, torch_frames: np.ndarray) -> None:
    frames = synth.generate(POINTS, PITCHES)
    assert frames.shape == torch_frames.shape == (3, 128, 300)
    assert np.abs(torch_frames).max() > 0.1  # real notes, not silence
    np.testing.assert_allclose(frames, torch_frames, atol=1e-3)


def test_static_step_mode_generates_the_same_notes(tiny_export: TinyChain,  # noqa: F811
                                                   torch_frames: np.ndarray) -> None:
    static = Synth(Bundle(tiny_export.bundle, providers="cpu", threads=1), step_mode="static")
    np.testing.assert_allclose(static.generate(POINTS, PITCHES), torch_frames, atol=1e-3)


def test_engine_renders_the_torch_reference_audio(synth: Synth, tiny_export: TinyChain) -> None:  # noqa: F811
    model, _ = load_transformer(tiny_export.transformer)
    reference = render_notes(model, load_codec(tiny_export.codec), 0.6, -0.1, [48, 60])
    audio = synth.render(np.array([[0.6, -0.1]] * 2, np.float32), np.array([48, 60]))
    assert audio.shape == reference.shape == (2, 96000) and audio.dtype == np.float32
    assert np.isfinite(audio).all() and np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(audio, reference, atol=1e-3)


def test_render_decodes_while_generating_with_the_same_audio(synth: Synth,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pgesam_engine import synth as synth_mod
    assert synth.m.stream_tail == "out_istft_overlap" and synth.pipelines(300) and not synth.pipelines(10)
    after = synth.decode(synth.generate(POINTS, PITCHES))
    np.testing.assert_allclose(synth.render(POINTS, PITCHES), after, atol=1e-5)  # the tail state included
    short = synth.render(POINTS[:1], PITCHES[:1], n_frames=10)  # shorter than a chunk: decoded after
    np.testing.assert_allclose(short, synth.decode(synth.generate(POINTS[:1], PITCHES[:1], n_frames=10)), atol=1e-6)

    def broken(self, frames):
        raise RuntimeError("decoder exploded")
    monkeypatch.setattr(synth_mod.StreamDecoder, "push", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):  # a failure on the decoding thread reaches the caller
        synth.render(POINTS[:1], PITCHES[:1])


def test_streamed_note_equals_the_rendered_note(synth: Synth) -> None:
    whole = synth.render(POINTS[:1], PITCHES[:1])[0]
    streamed = np.concatenate(list(synth.stream(POINTS[0], int(PITCHES[0]), chunk=16)))
    assert len(streamed) == len(whole)  # the lookahead dropped at the start, the tail appended at the end
    np.testing.assert_allclose(streamed, whole, atol=1e-4)


def test_engine_places_audio_where_the_vae_does(synth: Synth, tiny_export: TinyChain) -> None:  # noqa: F811
    audio = note_audio((1.0, 0.5, 0.25, 0.1), 60)
    vae, _ = load_vae(tiny_export.vae)
    with torch.no_grad():
        mu, _, logits = vae.encode(load_codec(tiny_export.codec).encode(torch.from_numpy(audio)[None]))
    found = synth.encode_audio(audio, 24000)
    assert (found.x, found.y) == pytest.approx((float(mu[0, 0]), float(mu[0, 1])), abs=1e-4)
    assert found.pitch == int(logits.argmax()) + 48
    assert found.nearest[0][0]["name"] in {"keyboard_acoustic_000", "organ_electronic_000", "flute_acoustic_000"}


def test_int8_variant_runs_in_the_engine(tiny_export: TinyChain, torch_frames: np.ndarray) -> None:  # noqa: F811
    int8 = Synth(Bundle(tiny_export.bundle, providers="cpu", threads=1, variant="int8"), step_mode="dynamic")
    frames = int8.generate(POINTS, PITCHES)
    err = np.abs(frames - torch_frames).max()
    assert 0 < err < 0.05 * np.abs(torch_frames).max()  # quantised: close, not identical


def test_auto_variant_is_int8_on_cpu_and_the_float_graphs_otherwise(tiny_export: TinyChain) -> None:  # noqa: F811
    from click.testing import CliRunner

    from pgesam_engine.bundle import AUTO_VARIANT, BundleError, choose_variant
    from pgesam_engine.cli import cli

    def step_variant(bundle: Bundle) -> str:
        return bundle.session("decoder_step").get_modelmeta().custom_metadata_map.get("variant", "float")
    auto = Bundle(tiny_export.bundle, providers="cpu", threads=1, variant=AUTO_VARIANT)
    assert auto.variant == "int8" and step_variant(auto) == "int8"
    assert step_variant(Bundle(tiny_export.bundle, providers="cpu", threads=1)) == "float"
    graphs = auto.manifest.raw["graphs"]
    assert choose_variant(AUTO_VARIANT, graphs, cpu_only=False, root=auto.root) is None  # CUDA: float graphs
    assert choose_variant(AUTO_VARIANT, {k: v for k, v in graphs.items() if "variant_of" not in v}, True,
                          auto.root) is None  # a bundle without int8 graphs
    with pytest.raises(BundleError, match="no 'fp16' graphs.*--variant fp16"):
        Bundle(tiny_export.bundle, providers="cpu", threads=1, variant="fp16")
    out = CliRunner().invoke(cli, ["info", "--bundle", str(tiny_export.bundle), "--provider", "cpu"]).output
    assert "graphs int8" in out
    out = CliRunner().invoke(cli, ["info", "--bundle", str(tiny_export.bundle), "--provider", "cpu",
                                   "--variant", "none"]).output
    assert "graphs float" in out


def test_cli_check_passes_on_the_exported_bundle(tiny_export: TinyChain) -> None:  # noqa: F811
    from click.testing import CliRunner

    from pgesam_train.cli import main
    result = CliRunner().invoke(main, ["export", "--check", str(tiny_export.bundle), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "every graph matches torch" in result.output
    for graph in ("vae_encoder", "transformer_encoder", "decoder_step_static", "codec_decoder_stream", "note"):
        assert f"| {graph} |" in result.output


def test_bundle_pitch_judges_the_bundle_and_its_int8_variant(tiny_export: TinyChain, tmp_path) -> None:  # noqa: F811
    import json

    from click.testing import CliRunner

    from pgesam_train.cli import main
    out = tmp_path / "pitch.json"
    result = CliRunner().invoke(main, ["bundle-pitch", str(tiny_export.bundle), "--variant", "int8",
                                       "--instruments", "1", "--every", "12", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"float32 graphs", "int8"} and all(0 <= r["within_50c"] <= 1 for r in rows.values())
    assert rows["int8"]["notes"] == rows["float32 graphs"]["notes"] == 3  # pitches 48, 60, 72
    assert "| int8 |" in result.output
    missing = CliRunner().invoke(main, ["bundle-pitch", str(tiny_export.bundle), "--variant", "fp16"])
    assert missing.exit_code != 0 and "no 'fp16' variant" in missing.output
