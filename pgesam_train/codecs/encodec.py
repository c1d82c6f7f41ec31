"""The paper's codec: EnCodec 24 kHz continuous embeddings (SEANet encoder output, before the quantizer).

128 dims at 75 frames/s (hop 320): a 4 s note at 24 kHz is (128, 300). Only the encoder and decoder of EnCodec are
used; the quantizer is dropped. Two ways to get weights:

- `encodec_pretrained=True`: Meta's `encodec_24khz-d7cc33bc.th` (a state_dict of `encodec.EncodecModel`), found at
  (1) an explicit path, (2) the torch hub cache `$TORCH_HOME/hub/checkpoints/`, (3) the `encodec` package's own
  download (needs internet; it saves into the hub cache). `PretrainedWeightsMissing` says what to do otherwise.
- `encodec_pretrained=False`: the same causal 24 kHz SEANet, randomly initialised, with `encodec_n_filters`,
  `encodec_lstm_layers` and `encodec_ratios` from the config (trained by us).

`encode`/`decode` run the `encodec` modules (differentiable, weight norm in place). `export_modules` returns
snapshots in the export-ready form of `encodec_stream` (weight norm folded, integer padding, streaming state).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..codec import Codec, CodecError
from ..compat import import_encodec
from ..config import CodecConfig
from .encodec_stream import DecoderGraph, DecoderStreamGraph, EncoderGraph

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
# The architecture of Meta's 24 kHz model (`EncodecModel.encodec_model_24khz`): the config must match to load it.
PRETRAINED_ARCH = {"sample_rate": 24000, "hop": 320, "dim": 128, "encodec_n_filters": 32,
                   "encodec_lstm_layers": 2, "encodec_ratios": (8, 5, 4, 2)}


class PretrainedWeightsMissing(FileNotFoundError):
    """Meta's EnCodec 24 kHz checkpoint is neither where we looked nor downloadable."""


def checkpoint_url() -> str:
    """The URL the `encodec` package downloads the 24 kHz checkpoint from."""
    import_encodec()
    from encodec.model import ROOT_URL  # noqa: PLC0415 - after the torchaudio shim
    from encodec.utils import _get_checkpoint_url  # noqa: PLC0415
    return _get_checkpoint_url(ROOT_URL, CHECKPOINT_NAME)


def hub_checkpoint_path() -> Path:
    """Where torch hub (and so the `encodec` package) caches the checkpoint: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME


def _download_state_dict() -> dict[str, Tensor]:
    """The `encodec` package's own download (torch hub, hash-checked), as `encodec_model_24khz()` does it."""
    import_encodec()
    from encodec.model import EncodecModel  # noqa: PLC0415
    return EncodecModel._get_pretrained(CHECKPOINT_NAME)


def _missing_message(reason: str) -> str:
    return (f"EnCodec 24 kHz weights not available ({reason}). Do one of:\n"
            f"  - download {checkpoint_url()}\n"
            f"    and put it at {hub_checkpoint_path()} (the torch hub cache; set TORCH_HOME to move it),\n"
            f"  - or pass its path: EncodecCodec.from_pretrained(Path('.../{CHECKPOINT_NAME}')),\n"
            "  - or train the EnCodec architecture yourself: a codec config with encodec_pretrained=False.")


def load_pretrained_state(path: Path | None = None) -> dict[str, Tensor]:
    """Meta's EnCodec 24 kHz state_dict, from `path` (a file, or a folder holding it), else the torch hub cache,
    else the `encodec` package's download. Raises `PretrainedWeightsMissing` with what to do."""
    if path is not None:
        path = Path(path)
        file = path / CHECKPOINT_NAME if path.is_dir() else path
        if not file.is_file():
            raise PretrainedWeightsMissing(_missing_message(f"no file at {file}"))
        return torch.load(file, map_location="cpu", weights_only=True)
    cached = hub_checkpoint_path()
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return _download_state_dict()
    except Exception as e:  # noqa: BLE001 - no network, refused, hash mismatch: all mean "get the file yourself"
        raise PretrainedWeightsMissing(_missing_message(
            f"not in {cached.parent}, and the download failed: {type(e).__name__}: {e}")) from e


def _split_state(state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The encoder.* and decoder.* parts of an EncodecModel state_dict (the quantizer is dropped)."""
    if not isinstance(state, dict) or not any(k.startswith("encoder.") for k in state):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CodecError(f"{source} is not an EnCodec model state_dict (no encoder.* keys; found {keys})")
    parts = ({k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in ("encoder.", "decoder."))
    return next(parts), next(parts)


def _check_config(config: CodecConfig) -> None:
    if config.backend != "encodec":
        raise CodecError(f"EncodecCodec needs a config with backend='encodec', got {config.backend!r}")
    if math.prod(config.encodec_ratios) != config.hop:
        raise CodecError(f"encodec_ratios {config.encodec_ratios} give a hop of {math.prod(config.encodec_ratios)} "
                         f"samples, but the config says hop={config.hop}")
    if config.encodec_pretrained:
        wrong = {k: getattr(config, k) for k, v in PRETRAINED_ARCH.items() if getattr(config, k) != v}
        if wrong:
            raise CodecError(f"Meta's EnCodec 24 kHz weights need {PRETRAINED_ARCH}; this config has {wrong}. "
                             "Use those values, or encodec_pretrained=False to train another size.")


class EncodecCodec(Codec):
    """EnCodec 24 kHz encoder/decoder without the quantizer: wav (B, S) <-> emb (B, 128, ceil(S / 320)).

    Both directions need at least `min_frames` frames (7: the causal convs reflect-pad up to 6 frames).
    State_dict keys are those of Meta's checkpoint, minus the quantizer: `encoder.model...`, `decoder.model...`.
    """

    stream_latency = 0  # the decoder is causal: streamed audio equals the full decode sample for sample

    def __init__(self, config: CodecConfig, pretrained_path: Path | None = None, *, load_pretrained: bool = True):
        """Build the SEANet pair of `config`; with `config.encodec_pretrained` load Meta's weights (see module doc)
        unless `load_pretrained=False` (the caller restores a state_dict of its own next)."""
        super().__init__(config)
        _check_config(config)
        self.encoder, self.decoder = self._build(config)
        if config.encodec_pretrained and load_pretrained:
            self.load_pretrained(pretrained_path)
        stream = DecoderStreamGraph(self.decoder)  # for its architecture facts only
        self.min_frames: int = stream.min_first_frames
        self._stream_spec = [(name, (1, *shape)) for name, shape in stream.state_spec()]

    @staticmethod
    def _build(config: CodecConfig) -> tuple[nn.Module, nn.Module]:
        """A causal, weight-normed SEANet encoder and decoder of the EnCodec 24 kHz kind."""
        import_encodec()
        from encodec.modules import SEANetDecoder, SEANetEncoder  # noqa: PLC0415
        kw = dict(channels=1, dimension=config.dim, n_filters=config.encodec_n_filters,
                  lstm=config.encodec_lstm_layers, ratios=list(config.encodec_ratios), causal=True,
                  norm="weight_norm")
        with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated; encodec still uses it
            warnings.simplefilter("ignore", FutureWarning)
            return SEANetEncoder(**kw), SEANetDecoder(**kw)

    def load_pretrained(self, path: Path | None = None) -> None:
        """Load Meta's 24 kHz encoder and decoder weights into this codec (see `load_pretrained_state`)."""
        state = load_pretrained_state(path)
        enc, dec = _split_state(state, str(path or "the EnCodec checkpoint"))
        try:
            self.encoder.load_state_dict(enc)
            self.decoder.load_state_dict(dec)
        except RuntimeError as e:
            raise CodecError(f"the EnCodec checkpoint does not fit the 24 kHz architecture: {e}") from e

    @classmethod
    def from_pretrained(cls, path: Path | None = None) -> "EncodecCodec":
        """Meta's EnCodec 24 kHz, from `path` (file or folder), the torch hub cache, or the `encodec` download."""
        return cls(CodecConfig(backend="encodec", encodec_pretrained=True), pretrained_path=path).eval()

    # ------------------------------------------------------------------------------------------ torch
    def _check_frames(self, frames: int, what: str) -> None:
        if frames < self.min_frames:
            raise CodecError(f"EnCodec {what} needs at least {self.min_frames} frames "
                             f"({(self.min_frames - 1) * self.hop + 1} samples), got {frames}")

    def _encode(self, wav: Tensor) -> Tensor:
        """wav (B, S) -> emb (B, dim, ceil(S / hop))."""
        self._check_frames(-(-wav.shape[-1] // self.hop), "encode")
        return self.encoder(wav[:, None, :])  # (B, 1, S) -> (B, dim, T)

    def _decode(self, emb: Tensor) -> Tensor:
        """emb (B, dim, T) -> wav (B, T * hop)."""
        self._check_frames(emb.shape[-1], "decode")
        return self.decoder(emb)[:, 0, :]  # (B, 1, T * hop) -> (B, T * hop)

    # ------------------------------------------------------------------------------------------ export
    def export_modules(self) -> dict[str, nn.Module]:
        """Snapshots of the current weights, weight norm folded, padding in integer ops (dynamic batch/length):
        codec_encoder: wav (B, S) -> emb (B, dim, ceil(S / hop)), S >= 1921;
        codec_decoder: emb (B, dim, T) -> wav (B, T * hop), T >= 7;
        codec_decoder_stream: (frames (B, dim, t), *state) -> (wav (B, t * hop), *new_state); first chunk t >= 7."""
        return {"codec_encoder": EncoderGraph(self.encoder), "codec_decoder": DecoderGraph(self.decoder),
                "codec_decoder_stream": DecoderStreamGraph(self.decoder)}

    def stream_state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(name, shape at batch 1)]: `started` (1, 1, 1), then conv buffers (1, C, pad), transposed-conv tails
        (1, C, kernel - stride) and LSTM (h, c) as (1, layers, H), in the order of the decoder's layers."""
        return list(self._stream_spec)

    def initial_stream_state(self, batch: int) -> list[Tensor]:
        """Zero state (and `started` = 0) for `batch` fresh streams."""
        return [torch.zeros((batch, *shape[1:])) for _, shape in self.stream_state_spec()]

    def decode_stream(self, frames: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One streaming step in torch: frames (B, dim, t) -> (wav (B, t * hop), new state).

        Builds a weight snapshot per call; for many steps, keep `export_modules()["codec_decoder_stream"]`."""
        out = DecoderStreamGraph(self.decoder)(frames, *state)
        return out[0], list(out[1:])
