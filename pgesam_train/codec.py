"""The codec interface: 24 kHz audio <-> (B, dim, T) continuous embeddings at sample_rate / hop frames per second.

Everything downstream (latent cache, VAE, Transformer, engine) sees a codec only through `Codec`. With the default
config a 4 s note is 96,000 samples at 24 kHz and 300 frames of 128 dims (hop 320, 75 frames/s).

Backends live in `pgesam_train.codecs` (`BACKENDS`): `stft` (ours, the default), `encodec` (the paper's),
`griffinlim` (the floor, no training). A backend subclasses `Codec` and implements `_encode`, `_decode`,
`export_modules`, `stream_state_spec`; `encode`/`decode` here validate the input first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch
from torch import Tensor

from . import paths
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CODEC_PRESET_TABLE, CodecConfig, from_dict, preset, to_dict
from .data.latents import same_encoder

log = logging.getLogger(__name__)

KIND = "codec"


class CodecError(ValueError):
    """Bad input to a codec (shape, sample rate), or an operation a backend cannot do."""


def frames_for(samples: int, hop: int = 320) -> int:
    """Frames a codec produces for `samples` samples: ceil(samples / hop)."""
    return -(-int(samples) // hop)


def resample(audio: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Resample (samples,) or (channels, samples) float audio with soxr; the result has exactly
    round(samples * to_sr / from_sr) samples (64,000 at 16 kHz -> 96,000 at 24 kHz)."""
    x = np.asarray(audio, dtype=np.float32)
    if from_sr == to_sr:
        return x
    n_out = round(x.shape[-1] * to_sr / from_sr)
    y = soxr.resample(x.T, from_sr, to_sr).T.astype(np.float32)  # soxr wants (samples, channels)
    if y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return np.ascontiguousarray(y[..., :n_out])


class Codec(torch.nn.Module):
    """Audio at `sample_rate` Hz <-> (B, dim, T) embeddings, T = ceil(samples / hop).

    Subclasses implement `_encode(wav (B, S)) -> (B, dim, T)`, `_decode(emb (B, dim, T)) -> (B, T * hop)`,
    `export_modules()` and `stream_state_spec()`, and set `stream_latency` (samples by which the streamed audio
    lags the full decode; 0 for fully causal designs) and, where one exists, `stream_tail_state`: the stream state
    that after the last frame holds the full decode's last `stream_latency` samples (so a streamed decode plus that
    state is the full decode, and the engine may decode a note while it is still being generated), or
    `stream_tail_output`: an extra last output of the stream graph (not fed back) that holds them.
    """

    stream_latency: int = 0
    stream_tail_state: str | None = None
    stream_tail_output: str | None = None

    def __init__(self, config: CodecConfig):
        super().__init__()
        self.config = config

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop(self) -> int:
        return self.config.hop

    @property
    def frame_rate(self) -> float:
        return self.config.sample_rate / self.config.hop

    @property
    def dim(self) -> int:
        return self.config.dim

    def encode(self, wav: Tensor, sample_rate: int | None = None) -> Tensor:
        """wav (B, S) float in [-1, 1] at `self.sample_rate` Hz -> emb (B, dim, ceil(S / hop)).

        Pass `sample_rate` to have it checked (a clear error instead of silently wrong embeddings)."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise CodecError(f"audio at {sample_rate} Hz, but this codec runs at {self.sample_rate} Hz: "
                             "resample first (pgesam_train.codec.resample)")
        if not isinstance(wav, Tensor) or wav.dim() != 2 or not wav.is_floating_point():
            got = tuple(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
            raise CodecError(f"encode expects a float tensor (batch, samples), got {got}; "
                             "use wav[None] for a single note")
        if wav.shape[1] == 0:
            raise CodecError("encode got 0 samples")
        return self._encode(wav)

    def decode(self, emb: Tensor) -> Tensor:
        """emb (B, dim, T) -> wav (B, T * hop) at `self.sample_rate` Hz."""
        if not isinstance(emb, Tensor) or emb.dim() != 3 or emb.shape[1] != self.dim:
            got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise CodecError(f"decode expects embeddings (batch, {self.dim}, frames), got {got}")
        if emb.shape[2] == 0:
            raise CodecError("decode got 0 frames")
        return self._decode(emb)

    def _encode(self, wav: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, emb: Tensor) -> Tensor:
        raise NotImplementedError

    def export_modules(self) -> dict[str, torch.nn.Module]:
        """{"codec_encoder": wav (B, S) -> emb, "codec_decoder": emb -> wav (B, T * hop),
        "codec_decoder_stream": (frames (B, dim, t), *state) -> (audio (B, t * hop), *new_state)},
        training-only parts stripped, traceable by torch.onnx.export (dynamo=False, opset 17)."""
        raise NotImplementedError

    def stream_state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(name, shape with batch 1), ...] of the streaming decoder's state tensors, in argument order."""
        raise NotImplementedError

    def initial_stream_state(self, batch: int) -> list[Tensor]:
        """Zero state for a fresh stream of `batch` notes."""
        return [torch.zeros((batch, *shape[1:])) for _, shape in self.stream_state_spec()]

    def decode_stream(self, frames: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One streaming step in torch: frames (B, dim, t) -> (audio (B, t * hop), new state)."""
        out = self.export_modules()["codec_decoder_stream"](frames, *state)
        return out[0], list(out[1:])


def backend_class(name: str) -> type[Codec]:
    """The Codec subclass of a backend name, with a clear error for unknown names."""
    from .codecs import BACKENDS
    if name not in BACKENDS:
        raise CodecError(f"unknown codec backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def codec_preset(name: str, backend: str = "stft") -> CodecConfig:
    """The `tiny` (tests) or `small` (2 CPU cores) codec config for one backend."""
    backend_class(backend)
    return dataclasses.replace(preset(CODEC_PRESET_TABLE, name, "codec"), backend=backend)


def build_codec(config: CodecConfig, **kwargs: Any) -> Codec:
    """A fresh codec of `config.backend` (random init, or pretrained where the backend says so); `kwargs` go to
    the backend's constructor."""
    return backend_class(config.backend)(config, **kwargs)


def save_codec(path: Path, codec: Codec, optimizer: torch.optim.Optimizer | None = None, step: int = 0,
               extra: dict[str, Any] | None = None) -> Path:
    """Atomically write a kind-"codec" checkpoint carrying the codec's config."""
    return save_checkpoint(Path(path), KIND, to_dict(codec.config), codec, optimizer=optimizer, step=step,
                           extra=extra)


def load_codec(path: Path) -> Codec:
    """Rebuild a codec from a checkpoint (its stored config only) in eval mode."""
    return codec_from_state(load_checkpoint(Path(path), KIND))


def codec_from_state(state: dict) -> Codec:
    """A codec from a loaded kind-"codec" checkpoint dict (`pgesam_train.checkpoint.load_checkpoint`), eval mode."""
    config = from_dict(CodecConfig, state["config"])
    # the checkpoint holds every weight: a backend that would fetch pretrained weights need not (encodec)
    skip = "load_pretrained" in inspect.signature(backend_class(config.backend)).parameters
    codec = build_codec(config, **({"load_pretrained": False} if skip else {}))
    codec.load_state_dict(state["model"])
    return codec.eval()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, float32 values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


ENCODER_FIELDS = ("sample_rate", "hop", "dim", "n_fft", "n_mels", "encoder", "width", "kernel", "causal", "ffn_mult",
                  "encodec_n_filters", "encodec_lstm_layers", "encodec_ratios")
MEL_ENCODER_FIELDS = ("sample_rate", "hop", "dim", "n_fft", "n_mels", "encoder")  # all that shapes a log-mel


def encoder_kind(config: CodecConfig) -> str:
    """"mel" for the fixed log-mel encoder (stft and griffinlim backends share it), else the backend (+ encoder)."""
    if config.backend in ("stft", "griffinlim") and config.encoder == "mel":
        return "mel"
    return config.backend if config.backend != "stft" else f"stft-{config.encoder}"


def encoder_sha256(codec: Codec) -> str:
    """Hash of what the embeddings depend on: the encoder's parameters and buffers (fixed DFT and mel bases
    included), and the config fields that shape the encoder. Training the decoder further leaves it unchanged."""
    h = hashlib.sha256()
    config = to_dict(codec.config)
    fields = {k: config[k] for k in ENCODER_FIELDS}
    if encoder_kind(codec.config) == "mel":  # the log-mel has no width or kernel: those are hashed at their defaults,
        defaults = to_dict(CodecConfig())  # so a narrower decoder over the same log-mel reads the same latents
        fields.update({k: defaults[k] for k in ENCODER_FIELDS if k not in MEL_ENCODER_FIELDS})
    h.update(json.dumps({"kind": encoder_kind(codec.config), **fields}, sort_keys=True).encode())
    tensors = dict(codec.encoder.named_parameters())
    tensors.update(codec.encoder.named_buffers())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def codec_id(codec: Codec) -> dict:
    """JSON identity of a codec for latent caches: {"name", "backend", "config", "encoder_sha256",
    "weights_sha256"}, with JSON types only (lists, not tuples), so it compares equal to itself after a round trip
    through meta.json.

    Latent caches are named and matched by `encoder_sha256` (the embeddings depend on the encoder only), so a
    decoder trained further, or another decoder over the same fixed log-mel encoder (the Griffin-Lim floor),
    reads the same cache. `weights_sha256` names the exact decoder for reports."""
    enc, digest = encoder_sha256(codec), weights_sha256(codec)
    ident = {"name": f"{encoder_kind(codec.config)}-{enc[:12]}", "backend": codec.config.backend,
             "config": to_dict(codec.config), "encoder_sha256": enc, "weights_sha256": digest}
    return json.loads(json.dumps(ident))


def find_codec_checkpoint(identity: dict | None) -> Path | None:
    """The codec checkpoint under $PGESAM_HOME/checkpoints/codec whose encoder made `identity`'s latents (the
    exact weights first, then the most recently trained decoder over the same encoder), or None."""
    if not identity:
        return None
    found = []
    for path in (paths.home() / "checkpoints" / "codec").glob("*/*.pt"):
        try:
            ident = codec_id(load_codec(path))
        except ValueError as e:  # another kind or format
            log.debug("skipping %s: %s", path, e)
            continue
        if same_encoder(ident, identity):
            found.append((ident["weights_sha256"] == identity.get("weights_sha256"), path.stat().st_mtime, path))
    return max(found)[2] if found else None
