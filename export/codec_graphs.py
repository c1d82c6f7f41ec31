"""Graphs `codec_encoder`, `codec_decoder` and `codec_decoder_stream`, from any backend's `Codec.export_modules()`.

The backend decides what is inside (it strips its own training-only parts, e.g. EnCodec's weight norm); this
module names inputs, outputs and dynamic axes the way docs/bundle.md says, so the bundle is the same whatever the
backend. Streaming state tensors are named `in_<state>` / `out_<state>` after `Codec.stream_state_spec()`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pgesam_train.codec import Codec, CodecError

from .manifest import ExportError, GraphSpec

ENCODER, DECODER, STREAM = "codec_encoder", "codec_decoder", "codec_decoder_stream"
EXAMPLE_FRAMES = 16  # traced length: above every backend's minimum, not one of the lengths tests probe


def export_modules(codec: Codec) -> dict[str, nn.Module]:
    """The backend's export-ready modules in eval mode; ExportError for a backend without an ONNX form."""
    try:
        modules = codec.export_modules()
    except (CodecError, NotImplementedError) as e:
        raise ExportError(f"the {codec.config.backend} codec cannot be exported: {e}") from e
    for m in modules.values():
        m.eval().requires_grad_(False)
    return modules


def stream_state(codec: Codec) -> list[tuple[str, tuple[int, ...]]]:
    """[(name, shape at batch 1)] of the streaming decoder's state, ExportError when it has none."""
    try:
        return list(codec.stream_state_spec())
    except (CodecError, NotImplementedError) as e:
        raise ExportError(f"the {codec.config.backend} codec has no streaming decoder: {e}") from e


def min_first_frames(codec: Codec) -> int:
    """Fewest frames the first chunk of a stream (and a whole decode) needs: EnCodec's reflect padding reads
    ahead (7 frames at 24 kHz); 1 for codecs without such a limit."""
    return int(getattr(codec, "min_frames", 1))


def example_frames(codec: Codec, batch: int, frames: int, seed: int = 0) -> Tensor:
    """Random embeddings (B, dim, frames) at roughly the scale of the codec's own encodings (a log-mel encoder's
    frames are natural logs of mel magnitudes, about -7 to 1: centred at -3)."""
    from pgesam_train.codec import encoder_kind
    emb = torch.randn(batch, codec.dim, frames, generator=torch.Generator().manual_seed(seed))
    return emb - 3.0 if encoder_kind(codec.config) == "mel" else emb


def example_audio(codec: Codec, batch: int, samples: int, seed: int = 0) -> Tensor:
    """Random harmonic tones over white noise 10 dB below them (B, samples), peak about 0.8.

    The noise floor matters for parity checks of log-magnitude encoders: next to a pure tone, STFT bins hold only
    float32 cancellation residue, whose log differs between onnxruntime and torch by up to ~1e-2 (a relative
    error of a bin ~80 dB below the tone, which nothing downstream hears); over a noise floor both agree to ~2e-5.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / codec.sample_rate
    f0 = 110.0 * 2 ** (torch.rand(batch, 1, generator=g, dtype=torch.float64) * 3)
    tone = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in (1, 2, 3))
    noise = 0.1 * torch.randn(batch, samples, generator=g, dtype=torch.float64)
    return (0.3 * tone + noise).float()


def codec_encoder_spec(codec: Codec, batch: int = 2, modules: dict[str, nn.Module] | None = None
                       ) -> GraphSpec:
    """audio (B, samples) -> emb (B, dim, T = ceil(samples / hop)); batch and length dynamic."""
    module = (modules or export_modules(codec))[ENCODER]
    audio = example_audio(codec, batch, EXAMPLE_FRAMES * codec.hop)
    axes = {"audio": {0: "B", 1: "samples"}, "emb": {0: "B", 2: "T"}}
    return GraphSpec(ENCODER, module, (audio,), ["audio"], ["emb"], axes)


def codec_decoder_spec(codec: Codec, batch: int = 2, modules: dict[str, nn.Module] | None = None
                       ) -> GraphSpec:
    """emb (B, dim, T) -> audio (B, T * hop); batch and length dynamic."""
    module = (modules or export_modules(codec))[DECODER]
    axes = {"emb": {0: "B", 2: "T"}, "audio": {0: "B", 1: "samples"}}
    return GraphSpec(DECODER, module, (example_frames(codec, batch, EXAMPLE_FRAMES),), ["emb"], ["audio"], axes)


def codec_decoder_stream_spec(codec: Codec, batch: int = 2, modules: dict[str, nn.Module] | None = None
                              ) -> GraphSpec:
    """(frames (B, dim, t), in_<state>...) -> (audio (B, t * hop), out_<state>...); batch and t dynamic."""
    module = (modules or export_modules(codec))[STREAM]
    names = [name for name, _ in stream_state(codec)]
    state = codec.initial_stream_state(batch)
    axes = {"frames": {0: "B", 2: "t"}, "audio": {0: "B", 1: "samples"}}
    axes.update({f"{p}_{n}": {0: "B"} for n in names for p in ("in", "out")})
    tail = [codec.stream_tail_output] if codec.stream_tail_output else []
    axes.update({n: {0: "B"} for n in tail})
    args = (example_frames(codec, batch, EXAMPLE_FRAMES), *state)
    return GraphSpec(STREAM, module, args, ["frames", *[f"in_{n}" for n in names]],
                     ["audio", *[f"out_{n}" for n in names], *tail], axes)


def codec_specs(codec: Codec) -> list[GraphSpec]:
    """All three codec graphs (ExportError for a codec that has no ONNX form)."""
    modules = export_modules(codec)
    return [codec_decoder_spec(codec, modules=modules), codec_decoder_stream_spec(codec, modules=modules),
            codec_encoder_spec(codec, modules=modules)]


def stream_manifest(codec: Codec) -> dict:
    """The manifest's `codec_stream`: state names and shapes (batch 1), latency in samples, first-chunk minimum,
    and where the full decode's last `latency_samples` are after the last frame, when the codec has them: a state
    (`tail_state`) or an extra output of the stream graph (`tail_output`)."""
    state = stream_state(codec)
    out = {"state": [{"name": n, "shape": list(s)} for n, s in state],
           "latency_samples": int(codec.stream_latency), "min_first_frames": min_first_frames(codec)}
    if codec.stream_tail_state is not None:
        if codec.stream_tail_state not in {n for n, _ in state}:
            raise ExportError(f"codec stream tail state {codec.stream_tail_state!r} is not one of its stream states")
        out["tail_state"] = codec.stream_tail_state
    if codec.stream_tail_output is not None:
        out["tail_output"] = codec.stream_tail_output
    return out


def torch_decode_stream(codec: Codec, frames: Tensor, chunks: list[int]) -> Tensor:
    """Torch streaming decode of frames (B, dim, T) in chunks of the given sizes (summing to T) -> audio
    (B, T * hop), the first `stream_latency` samples being the codec's lookahead."""
    module = export_modules(codec)[STREAM]
    state, out, pos = codec.initial_stream_state(frames.shape[0]), [], 0
    with torch.no_grad():
        for n in chunks:
            audio, *rest = module(frames[:, :, pos:pos + n], *state)
            state = rest[:len(state)]
            out.append(audio)
            pos += n
    return torch.cat(out, dim=1)
