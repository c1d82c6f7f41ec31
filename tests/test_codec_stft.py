"""The stft backend: DFT-basis STFT/iSTFT, ONNX parity at several lengths, streaming == full decode (torch and ORT)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pgesam_train.codec import CodecError, build_codec, codec_preset
from pgesam_train.codecs.modules import ISTFT, STFT, mel_filterbank
from pgesam_train.eval_codec import export_codec_onnx

LENGTHS = (7, 8, 75, 300, 301)  # frames
CHUNKS = (1, 3, 8)


def tiny_codec(encoder: str = "mel", phase: str = "advance", mel_prior: bool = True, refine_iters: int = 0):
    torch.manual_seed(0)
    config = dataclasses.replace(codec_preset("tiny"), encoder=encoder, phase=phase, mel_prior=mel_prior,
                                 refine_iters=refine_iters)
    codec = build_codec(config).eval()
    with torch.no_grad():  # a decoder as after training: residual branches and every head output matter
        for block in codec.decoder.blocks:
            block.gamma.fill_(0.5)
        torch.nn.init.normal_(codec.decoder.head.proj.weight, std=0.05)
        torch.nn.init.normal_(codec.decoder.head.proj.bias, mean=1.0, std=0.5)
    return codec


def log_mel_like(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random embeddings at the level of real log-mel frames (natural log of mel magnitudes, about -7 to 1)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) - 3.0)


@pytest.mark.parametrize("mel_prior", [True, False])
def test_test_decoder_is_loud_enough_for_the_tolerances(mel_prior):
    codec = tiny_codec(mel_prior=mel_prior)
    with torch.no_grad():
        y = codec.decode(log_mel_like((1, 128, 40)))
    assert 0.05 < y.std() < 5  # so that the parity tolerance of 1e-4 is tight (< 0.2 % of the level)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_stft_istft_is_a_perfect_reconstruction_and_streams():
    stft, istft = STFT(1280, 320), ISTFT(1280, 320)
    x = torch.randn(2, 320 * 40)
    re, im = stft(x)
    assert re.shape == (2, 641, 40)
    y = istft(re, im)
    torch.testing.assert_close(y[:, :-960], x[:, :-960], atol=1e-5, rtol=0)  # the tail lacks later frames
    overlap, chunks = torch.zeros(2, 960), []
    for a in range(0, 40, 7):
        out, overlap = istft.step(re[..., a:a + 7], im[..., a:a + 7], overlap)
        chunks.append(out)
    torch.testing.assert_close(torch.cat(chunks, 1)[:, 960:], y[:, :-960], atol=1e-5, rtol=0)


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(24000, 1280, 128).numpy()
    np.testing.assert_allclose(ours, librosa.filters.mel(sr=24000, n_fft=1280, n_mels=128), atol=1e-6)


def test_encoder_is_causal():
    codec = tiny_codec("learned")
    x = torch.randn(1, 320 * 20)
    y = x.clone()
    y[:, 320 * 12:] = torch.randn(1, 320 * 8)  # change the future only
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x)[..., :12], codec.encode(y)[..., :12])


@pytest.mark.parametrize("encoder,refine_iters", [("mel", 0), ("learned", 0), ("mel", 2)])
def test_onnx_parity_at_every_length(tmp_path, encoder, refine_iters):
    codec = tiny_codec(encoder, refine_iters=refine_iters)
    paths = export_codec_onnx(codec, tmp_path)
    enc, dec = session(paths["codec_encoder"]), session(paths["codec_decoder"])
    rng = np.random.default_rng(0)
    for frames in LENGTHS:
        wav = (0.3 * rng.standard_normal((2, frames * 320 - 17))).astype(np.float32)
        with torch.no_grad():
            ref_emb = codec.encode(torch.from_numpy(wav)).numpy()
            emb = ref_emb + 0.1 * rng.standard_normal(ref_emb.shape).astype(np.float32)
            ref_wav = codec.decode(torch.from_numpy(emb)).numpy()
        (got_emb,) = enc.run(None, {"wav": wav})
        (got_wav,) = dec.run(None, {"emb": emb})
        assert got_emb.shape == (2, 128, frames) and got_wav.shape == (2, frames * 320)
        np.testing.assert_allclose(got_emb, ref_emb, atol=1e-4, rtol=0, err_msg=f"encoder at {frames} frames")
        np.testing.assert_allclose(got_wav, ref_wav, atol=1e-4, rtol=0, err_msg=f"decoder at {frames} frames")


@pytest.mark.parametrize("phase", ["advance", "angle"])
def test_streaming_equals_full_decode_in_torch_and_onnx(tmp_path, phase):
    codec = tiny_codec(phase=phase)
    spec = codec.stream_state_spec()
    assert [n for n, _ in spec] == ["conv_in", "block0"] + (["phase"] if phase == "advance" else []) + ["istft_overlap"]
    assert codec.stream_latency == 960 and spec[-1][1] == (1, 960)
    assert [tuple(s.shape) for s in codec.initial_stream_state(2)] == [(2, *shape[1:]) for _, shape in spec]
    stream = session(export_codec_onnx(codec, tmp_path)["codec_decoder_stream"])
    frames = 40
    emb = log_mel_like((2, 128, frames), seed=1)
    with torch.no_grad():
        whole = codec.decode(emb).numpy()
    full = whole[:, :-960]  # (B, frames * hop - latency)
    assert codec.stream_tail_state == "istft_overlap"
    for chunk in CHUNKS:
        state = codec.initial_stream_state(2)
        ort_state = [s.numpy() for s in state]
        torch_out, ort_out = [], []
        for a in range(0, frames, chunk):
            with torch.no_grad():
                audio, state = codec.decode_stream(emb[..., a:a + chunk], state)
            torch_out.append(audio.numpy())
            feeds = {"frames": emb[..., a:a + chunk].numpy(), **{f"in_{n}": s for (n, _), s in zip(spec, ort_state)}}
            audio_ort, *ort_state = stream.run(None, feeds)
            ort_out.append(audio_ort)
        for name, out in (("torch", torch_out), ("onnx", ort_out)):
            streamed = np.concatenate(out, axis=1)
            assert streamed.shape == (2, frames * 320)
            np.testing.assert_allclose(streamed[:, 960:], full, atol=1e-4, rtol=0, err_msg=f"{name}, chunk {chunk}")
        tail = {"torch": state[-1].numpy(), "onnx": ort_state[-1]}  # the tail state: the full decode's last samples
        for name, t in tail.items():
            np.testing.assert_allclose(t, whole[:, -960:], atol=1e-4, rtol=0, err_msg=f"{name} tail, chunk {chunk}")


def _consistency_error(codec, emb: torch.Tensor) -> float:
    """Spectral convergence between the decoder's intended magnitudes (the head's) and those of its audio."""
    dec = codec.decoder
    with torch.no_grad():
        re, im = dec.spectrum(emb)
        wanted = torch.sqrt(re * re + im * im)
        y = dec.istft.overlap_add(*(dec.refine(re, im) if dec.refine is not None else (re, im)))
        got_re, got_im = torch.nn.functional.conv1d(y[:, None], STFT(1280, 320).basis, stride=320).chunk(2, dim=1)
        got = torch.sqrt(got_re ** 2 + got_im ** 2)
    return float(torch.linalg.norm(got - wanted) / torch.linalg.norm(wanted))


def test_phase_refinement_makes_the_spectrum_consistent():
    emb = log_mel_like((2, 128, 40), seed=4)
    errors = [_consistency_error(tiny_codec(refine_iters=k), emb) for k in (0, 1, 4)]
    # more iterations bring the audio's STFT closer to the magnitudes asked for (by 12 % and 8 % here)
    assert errors[1] < 0.95 * errors[0] and errors[2] < 0.95 * errors[1], errors


def test_refined_decoder_streams_exactly_with_its_tail(tmp_path):
    codec = tiny_codec(refine_iters=2)
    spec = codec.stream_state_spec()
    assert [n for n, _ in spec][-2:] == ["refine_history", "istft_overlap"] and spec[-2][1] == (1, 2 * 641, 12)
    latency = 960 + 2 * 3 * 320  # the overlap, then 3 frames either side per iteration
    assert codec.stream_latency == latency and codec.stream_tail_output == "tail" and codec.stream_tail_state is None
    stream = session(export_codec_onnx(codec, tmp_path)["codec_decoder_stream"])
    assert [o.name for o in stream.get_outputs()][-1] == "tail"
    module = codec.export_modules()["codec_decoder_stream"]
    frames = 40
    emb = log_mel_like((2, 128, frames), seed=1)
    with torch.no_grad():
        whole = codec.decode(emb).numpy()
    for chunk in CHUNKS:
        state, ort_state = codec.initial_stream_state(2), [s.numpy() for s in codec.initial_stream_state(2)]
        out = {"torch": [], "onnx": []}
        for a in range(0, frames, chunk):
            with torch.no_grad():
                audio, *rest = module(emb[..., a:a + chunk], *state)
            state, tail = rest[:-1], rest[-1].numpy()
            out["torch"].append(audio.numpy())
            feeds = {"frames": emb[..., a:a + chunk].numpy(), **{f"in_{n}": s for (n, _), s in zip(spec, ort_state)}}
            audio_ort, *rest_ort = stream.run(None, feeds)
            ort_state, ort_tail = rest_ort[:-1], rest_ort[-1]
            out["onnx"].append(audio_ort)
        for name, parts in out.items():
            streamed = np.concatenate(parts + [tail if name == "torch" else ort_tail], axis=1)
            assert streamed.shape == (2, frames * 320 + latency)
            np.testing.assert_allclose(streamed[:, latency:], whole, atol=1e-4, rtol=0, err_msg=f"{name}, chunk {chunk}")


def test_centred_decoder_decodes_but_does_not_stream():
    codec = build_codec(dataclasses.replace(codec_preset("tiny"), causal=False)).eval()
    with torch.no_grad():
        assert codec.decode(torch.randn(1, 128, 9)).shape == (1, 9 * 320)
    with pytest.raises(CodecError, match="causal"):
        codec.stream_state_spec()


def test_bad_stream_state_is_refused():
    codec = tiny_codec()
    with pytest.raises(CodecError, match="stream state"):
        codec.decode_stream(torch.randn(1, 128, 2), codec.initial_stream_state(1)[:-1])
