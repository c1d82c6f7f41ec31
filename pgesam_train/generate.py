"""Decoding: turn a timbre point and a pitch into a note's codec frames with a `TimbreTransformer`.

Two ways, which give the same frames (tests hold them to 1e-5 in float32):
    generate_uncached   the whole encoder-decoder forward recomputed for every new frame, as the authors'
                        `generate()` does: O(T^2) work per note. The reference our speed-ups are measured against.
    generate_cached     the encoder once (`EncoderCall`), then one decoder step per frame with an explicit
                        self-attention KV cache: growing (`DecoderStep`), preallocated (`DecoderStep(static=True)`),
                        or preallocated and written in place (eager torch's fast path).
Every function is batched: row b of z and pitch is one note. Caches are lists with one (keys, values) pair per
decoder layer, each (B, H, length, hd) (`pgesam_train.transformer.KV`).

`EncoderCall` and `DecoderStep` are the pure modules the ONNX export traces: state goes in and comes out, nothing
is kept between calls.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import TransformerConfig
from .transformer import KV, N_COND_TOKENS, TimbreTransformer


class EncoderCall(nn.Module):
    """(z (B, 2), pitch (B,) int64 MIDI) -> (memory (B, 3, d), cross_kv: per layer keys, values (B, H, 3, hd))."""

    def __init__(self, model: TimbreTransformer):
        super().__init__()
        self.model = model
        self.train(model.training)  # a new Module starts in training mode; take the model's

    def forward(self, z: torch.Tensor, pitch: torch.Tensor) -> tuple[torch.Tensor, list[KV]]:
        memory = self.model.encode(z, pitch)
        return memory, self.model.cross_kv(memory)


class DecoderStep(nn.Module):
    """(frame (B, dim), position, self_kv, cross_kv) -> (next frame (B, dim), self_kv after this position).

    Growing cache (default): self_kv per layer (B, H, P, hd) x 2 -> (B, H, P+1, hd) x 2, `position` an int64
    scalar or (B,) equal to P. static=True: a preallocated cache (B, H, frames, hd) x 2 per layer, written at
    `position` () or (B,), same shapes out.
    """

    def __init__(self, model: TimbreTransformer, static: bool = False):
        super().__init__()
        self.model, self.static = model, static
        self.train(model.training)  # a new Module starts in training mode; take the model's

    def forward(self, frame: torch.Tensor, position: torch.Tensor, self_kv: list[KV], cross_kv: list[KV]
                ) -> tuple[torch.Tensor, list[KV]]:
        step = self.model.decode_step_static if self.static else self.model.decode_step
        return step(frame, position, self_kv, cross_kv)


def cache_shape(cfg: TransformerConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    """(B, H, length, hd): one layer's keys or values, self-attention (length P) or cross-attention (3)."""
    return (batch, cfg.n_heads, length, cfg.head_dim)


def empty_cache(cfg: TransformerConfig, batch: int, static: bool = False, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> list[KV]:
    """A fresh self-attention cache, per layer (keys, values): (B, H, 0, hd), or (B, H, frames, hd) of zeros
    when static."""
    shape = cache_shape(cfg, batch, cfg.frames if static else 0)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_decoder_layers)]


def cross_kv_shape(cfg: TransformerConfig, batch: int) -> tuple[int, int, int, int]:
    """(B, H, 3, hd): each of the cross-attention keys and values `EncoderCall` returns per layer."""
    return cache_shape(cfg, batch, N_COND_TOKENS)


def conditioning(cfg: TransformerConfig, x: Sequence[float] | float, y: Sequence[float] | float,
                 pitch: Sequence[int] | int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Timbre points and MIDI pitches as model inputs z (B, 2) float32 and pitch (B,) int64; scalars broadcast.

    Raises ValueError for a pitch outside the model's range.
    """
    xs, ys, ps = (torch.atleast_1d(torch.as_tensor(v)) for v in (x, y, pitch))
    b = max(len(xs), len(ys), len(ps))
    z = torch.stack([xs.float().expand(b), ys.float().expand(b)], dim=1).to(device)
    p = ps.long().expand(b).to(device)
    check_pitch(cfg, p)
    return z, p


def check_pitch(cfg: TransformerConfig, pitch: torch.Tensor) -> None:
    """Raise ValueError unless every MIDI pitch is one the model was trained on."""
    lo, hi = cfg.pitch_min, cfg.pitch_min + cfg.n_pitches - 1
    if pitch.numel() and (int(pitch.min()) < lo or int(pitch.max()) > hi):
        raise ValueError(f"MIDI pitch {pitch.tolist()} is outside the model's range {lo}-{hi}")


def _check(model: TimbreTransformer, pitch: torch.Tensor, n_frames: int | None) -> int:
    """Validate a generation request; returns the number of frames to generate."""
    if model.training:
        raise RuntimeError("generation needs the model in eval mode (dropout off): call model.eval() first")
    cfg = model.config
    check_pitch(cfg, pitch)
    n = cfg.frames if n_frames is None else n_frames
    if not 1 <= n <= cfg.frames:
        raise ValueError(f"n_frames must be in 1..{cfg.frames}, got {n}")
    return n


@torch.inference_mode()
def generate_uncached(model: TimbreTransformer, z: torch.Tensor, pitch: torch.Tensor,
                      n_frames: int | None = None) -> torch.Tensor:
    """Reference generation: the full forward (encoder included) recomputed at every step.

    z (B, 2), pitch (B,) MIDI -> frames (B, dim, n_frames), free-running from <BOS>.
    """
    cfg = model.config
    n = _check(model, pitch, n_frames)
    frames = torch.zeros(z.shape[0], 1, cfg.dim, device=z.device)  # <BOS>  (B, 1, dim)
    for _ in range(n):
        out = model(z, pitch, frames)  # (B, t, dim)
        frames = torch.cat([frames, out[:, -1:]], dim=1)
    return frames[:, 1:].transpose(1, 2).contiguous()  # (B, dim, n)


CACHE_MODES = ("dynamic", "static", "inplace")


@torch.inference_mode()
def generate_cached(model: TimbreTransformer, z: torch.Tensor, pitch: torch.Tensor, n_frames: int | None = None,
                    cache: str = "inplace") -> torch.Tensor:
    """KV-cached generation: z (B, 2), pitch (B,) MIDI -> frames (B, dim, n_frames), free-running from <BOS>.

    cache: "dynamic" (`DecoderStep`, growing cache), "static" (`DecoderStep(static=True)`, preallocated cache)
    or "inplace" (the preallocated cache written in place, on `TimbreTransformer.plan_inplace`'s plan: eager
    torch's fastest).
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    cfg = model.config
    n = _check(model, pitch, n_frames)
    _, cross = EncoderCall(model)(z, pitch)
    dtype = cross[0][0].dtype
    kv = empty_cache(cfg, z.shape[0], static=cache != "dynamic", device=z.device, dtype=dtype)
    frame = torch.zeros(z.shape[0], cfg.dim, device=z.device, dtype=dtype)  # <BOS>
    step = DecoderStep(model, static=cache == "static")
    plan = model.plan_inplace(cross) if cache == "inplace" else None
    out = []
    for t in range(n):
        if plan is not None:
            frame = model.decode_step_inplace(frame, t, kv, plan)
        else:
            frame, kv = step(frame, torch.tensor(t, device=z.device), kv, cross)
        out.append(frame)
    return torch.stack(out, dim=2)  # (B, dim, n)


def generate(model: TimbreTransformer, x: Sequence[float] | float, y: Sequence[float] | float,
             pitch: Sequence[int] | int, n_frames: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Notes for timbre points (x, y) and MIDI pitches (scalars broadcast), generated with the KV cache in
    batches of `batch_size` -> frames (N, dim, n_frames) on the model's device."""
    device = next(model.parameters()).device
    z, p = conditioning(model.config, x, y, pitch, device=device)
    was_training = model.training
    model.eval()
    try:
        parts = [generate_cached(model, z[i:i + batch_size], p[i:i + batch_size], n_frames)
                 for i in range(0, len(p), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)
