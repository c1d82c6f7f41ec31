"""The `encodec` codec backend: shapes, pretrained loading (a random 24 kHz EnCodec saved like Meta's checkpoint),
ONNX export parity at several lengths, and streaming decode == full decode, in torch and in onnxruntime."""
from __future__ import annotations

import dataclasses
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pgesam_train.codec import CodecError, build_codec, codec_preset, load_codec, save_codec
from pgesam_train.codecs.encodec import (CHECKPOINT_NAME, EncodecCodec, PretrainedWeightsMissing, checkpoint_url,
                                         hub_checkpoint_path)
from pgesam_train.compat import import_encodec
from pgesam_train.config import CodecConfig

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4
LENGTHS = (7, 8, 75, 300, 301)  # frames
TINY = CodecConfig(backend="encodec", encodec_n_filters=4, encodec_lstm_layers=2, encodec_pretrained=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec() -> EncodecCodec:
    """A 4-filter SEANet at random init, weight-norm gains scrambled so that folding them matters."""
    torch.manual_seed(0)
    c = EncodecCodec(TINY).eval()
    with torch.no_grad():
        for name, p in c.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(torch.rand_like(p) + 0.5)
    return c


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                dynamic: dict[str, dict[int, str]]) -> ort.InferenceSession:
    """Legacy (TorchScript) export, opset 17, then an onnxruntime CPU session."""
    with warnings.catch_warnings():  # legacy-exporter deprecation, nn.LSTM's own trace notes: parity is tested
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def chunk_sizes(total: int, chunk: int, first: int) -> list[int]:
    sizes, t = [], 0
    while t < total:
        n = min(max(chunk, first) if t == 0 else chunk, total - t)
        sizes.append(n)
        t += n
    return sizes


# ------------------------------------------------------------------------------------------------ torch
def test_shapes_and_interface(codec: EncodecCodec) -> None:
    assert (codec.sample_rate, codec.hop, codec.frame_rate, codec.dim) == (24000, 320, 75.0, 128)
    with torch.no_grad():
        assert codec.encode(torch.randn(2, 24000)).shape == (2, 128, 75)
        assert codec.encode(torch.randn(1, 24001)).shape == (1, 128, 76)
        assert codec.decode(torch.randn(2, 128, 9)).shape == (2, 9 * 320)
    assert codec.min_frames == 7 and codec.stream_latency == 0
    spec = codec.stream_state_spec()
    state = codec.initial_stream_state(3)
    assert [s.shape for s in state] == [(3, *shape[1:]) for _, shape in spec]
    assert spec[0] == ("started", (1, 1, 1)) and all(shape[0] == 1 for _, shape in spec)


def test_bad_inputs_and_configs_raise(codec: EncodecCodec) -> None:
    with pytest.raises(CodecError, match="at least 7 frames"):
        codec.decode(torch.randn(1, 128, 6))
    with pytest.raises(CodecError, match="at least 7 frames"):
        codec.encode(torch.randn(1, 1920))
    with pytest.raises(CodecError, match="hop"):
        EncodecCodec(dataclasses.replace(TINY, encodec_ratios=(8, 5, 4)))
    with pytest.raises(CodecError, match="encodec_pretrained=False"):
        EncodecCodec(dataclasses.replace(TINY, encodec_pretrained=True))  # 4 filters: not Meta's architecture
    with pytest.raises(CodecError, match="backend='encodec'"):
        EncodecCodec(dataclasses.replace(TINY, backend="stft"))


def test_registry_preset_and_checkpoint_round_trip(tmp_path: Path) -> None:
    """`build_codec` finds this backend; a saved codec comes back from its checkpoint's config alone."""
    codec = build_codec(codec_preset("tiny", "encodec"))
    assert isinstance(codec, EncodecCodec) and not codec.config.encodec_pretrained
    path = save_codec(tmp_path / "codec.pt", codec, step=3)
    again = load_codec(path)
    wav = torch.randn(1, 8 * 320)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(wav), codec.encode(wav), atol=0, rtol=0)


def test_export_modules_equal_encodec_modules(codec: EncodecCodec) -> None:
    """The export-ready layers (folded weight norm, integer padding) reproduce the `encodec` modules."""
    graphs = codec.export_modules()
    assert set(graphs) == {"codec_encoder", "codec_decoder", "codec_decoder_stream"}
    assert not any(n.endswith(("weight_g", "weight_v")) for g in graphs.values() for n, _ in g.named_parameters())
    with torch.no_grad():
        for samples in (1921, 24000, 24001):
            wav = torch.randn(2, samples)
            torch.testing.assert_close(graphs["codec_encoder"](wav), codec.encode(wav), atol=1e-5, rtol=0)
        emb = torch.randn(2, 128, 20)
        torch.testing.assert_close(graphs["codec_decoder"](emb), codec.decode(emb), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_stream_equals_full_decode_torch(codec: EncodecCodec, chunk: int) -> None:
    stream = codec.export_modules()["codec_decoder_stream"]
    emb = torch.randn(2, 128, 40)
    with torch.no_grad():
        full = codec.decode(emb)
        state, outs, t = codec.initial_stream_state(2), [], 0
        for n in chunk_sizes(40, chunk, codec.min_frames):
            wav, *state = stream(emb[..., t:t + n], *state)
            assert wav.shape == (2, n * 320)
            outs.append(wav)
            t += n
    lag = codec.stream_latency
    torch.testing.assert_close(torch.cat(outs, -1)[:, lag:], full[:, :full.shape[1] - lag], atol=TOL, rtol=0)


def test_stream_items_start_independently(codec: EncodecCodec) -> None:
    """Two voices in one batch: the second starts 8 frames after the first (its state reset to the initial one)."""
    stream = codec.export_modules()["codec_decoder_stream"]
    a, b = torch.randn(1, 128, 24), torch.randn(1, 128, 16)
    with torch.no_grad():
        state = codec.initial_stream_state(2)
        out1, *state = stream(torch.cat([a[..., :8], torch.zeros(1, 128, 8)]), *state)
        state = [torch.cat([s[:1], s0[1:]]) for s, s0 in zip(state, codec.initial_stream_state(2))]
        out2, *state = stream(torch.cat([a[..., 8:16], b[..., :8]]), *state)  # b's first chunk: 8 frames
        out3, *state = stream(torch.cat([a[..., 16:], b[..., 8:]]), *state)
        torch.testing.assert_close(torch.cat([out1[0], out2[0], out3[0]]), codec.decode(a)[0], atol=TOL, rtol=0)
        torch.testing.assert_close(torch.cat([out2[1], out3[1]]), codec.decode(b)[0], atol=TOL, rtol=0)


def test_stream_first_chunk_too_short_raises(codec: EncodecCodec) -> None:
    stream = codec.export_modules()["codec_decoder_stream"]
    with pytest.raises(ValueError, match="first chunk"):
        stream(torch.randn(1, 128, 3), *codec.initial_stream_state(1))


# ------------------------------------------------------------------------------------------------- ONNX
def test_onnx_encoder_decoder_parity(codec: EncodecCodec, tmp_path: Path) -> None:
    graphs = codec.export_modules()
    batch = {0: "batch"}
    enc = export_onnx(graphs["codec_encoder"], (torch.randn(1, 75 * 320),), tmp_path / "enc.onnx", ["wav"], ["emb"],
                      {"wav": {**batch, 1: "samples"}, "emb": {**batch, 2: "frames"}})
    dec = export_onnx(graphs["codec_decoder"], (torch.randn(1, 128, 75),), tmp_path / "dec.onnx", ["emb"], ["wav"],
                      {"emb": {**batch, 2: "frames"}, "wav": {**batch, 1: "samples"}})
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for frames in LENGTHS:
            batch = 2 if frames == 8 else 1  # the batch axis is dynamic too
            for samples in (frames * 320, frames * 320 - 137):  # whole frames, and a partial last frame
                wav = rng.standard_normal((batch, samples)).astype(np.float32) * 0.3
                ref = codec.encode(torch.from_numpy(wav)).numpy()
                got = enc.run(None, {"wav": wav})[0]
                assert got.shape == ref.shape == (batch, 128, frames)
                assert np.abs(got - ref).max() < TOL, (frames, samples)
            emb = rng.standard_normal((batch, 128, frames)).astype(np.float32)
            ref = codec.decode(torch.from_numpy(emb)).numpy()
            got = dec.run(None, {"emb": emb})[0]
            assert got.shape == ref.shape == (batch, frames * 320)
            assert np.abs(got - ref).max() < TOL, frames


def test_onnx_stream_equals_full_decode(codec: EncodecCodec, tmp_path: Path) -> None:
    stream = codec.export_modules()["codec_decoder_stream"]
    names = [f"in_{n}" for n, _ in codec.stream_state_spec()]
    outs = [f"out_{n}" for n, _ in codec.stream_state_spec()]
    dynamic = {"frames": {0: "batch", 2: "t"}, "wav": {0: "batch", 1: "samples"}}
    dynamic.update({n: {0: "batch"} for n in names + outs})
    example = (torch.randn(1, 128, 8), *codec.initial_stream_state(1))
    sess = export_onnx(stream, example, tmp_path / "stream.onnx", ["frames", *names], ["wav", *outs], dynamic)
    emb = np.random.default_rng(1).standard_normal((2, 128, 40)).astype(np.float32)
    with torch.no_grad():
        full = codec.decode(torch.from_numpy(emb)).numpy()
    for chunk in (1, 3, 8):
        state = [s.numpy() for s in codec.initial_stream_state(2)]
        pieces, t = [], 0
        for n in chunk_sizes(40, chunk, codec.min_frames):
            wav, *state = sess.run(None, {"frames": emb[..., t:t + n], **dict(zip(names, state))})
            pieces.append(wav)
            t += n
        assert np.abs(np.concatenate(pieces, -1) - full).max() < TOL, chunk


# ------------------------------------------------------------------------------------- pretrained loading
@pytest.fixture(scope="module")
def fake_meta_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised EnCodec 24 kHz saved as Meta's file is: a state_dict of `EncodecModel`."""
    encodec = import_encodec()
    torch.manual_seed(1)
    with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("meta") / CHECKPOINT_NAME
    torch.save(state, path)
    return path, state


def assert_meta_weights(codec: EncodecCodec, state: dict[str, torch.Tensor]) -> None:
    ours = codec.state_dict()
    assert set(ours) == {k for k in state if k.startswith(("encoder.", "decoder."))}
    for k, v in ours.items():
        assert torch.equal(v, state[k]), k


def test_pretrained_from_explicit_path(fake_meta_checkpoint: tuple[Path, dict]) -> None:
    path, state = fake_meta_checkpoint
    codec = EncodecCodec.from_pretrained(path)
    assert codec.config.encodec_pretrained and codec.config.encodec_n_filters == 32
    assert_meta_weights(codec, state)
    assert_meta_weights(EncodecCodec.from_pretrained(path.parent), state)  # a folder holding the file
    with pytest.raises(PretrainedWeightsMissing, match="no file at"):
        EncodecCodec.from_pretrained(path.parent / "missing.th")


def test_pretrained_from_torch_hub_cache(fake_meta_checkpoint: tuple[Path, dict], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = fake_meta_checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / CHECKPOINT_NAME).symlink_to(path)
    assert hub_checkpoint_path() == tmp_path / "hub" / "checkpoints" / CHECKPOINT_NAME
    codec = EncodecCodec(CodecConfig(backend="encodec"))  # the defaults are Meta's architecture, pretrained
    assert_meta_weights(codec, state)


def test_pretrained_download_through_encodec(fake_meta_checkpoint: tuple[Path, dict], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing cached: the `encodec` package's own download is used (torch hub, stubbed: no network here)."""
    _, state = fake_meta_checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    urls: list[str] = []

    def fake_download(url: str, **kwargs) -> dict:
        urls.append(url)
        return state
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    assert_meta_weights(EncodecCodec(CodecConfig(backend="encodec")), state)
    assert urls == [checkpoint_url()] and urls[0].endswith("/encodec/v0/" + CHECKPOINT_NAME)


def test_pretrained_missing_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url: str, **kwargs) -> dict:
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsMissing) as info:
        EncodecCodec(CodecConfig(backend="encodec"))
    msg = str(info.value)
    assert checkpoint_url() in msg and str(tmp_path / "hub" / "checkpoints" / CHECKPOINT_NAME) in msg
    assert "no network" in msg and "encodec_pretrained=False" in msg


def test_not_an_encodec_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.th"
    torch.save({"model.weight": torch.zeros(3)}, path)
    with pytest.raises(CodecError, match="not an EnCodec model state_dict"):
        EncodecCodec.from_pretrained(path)
