"""Graphs `decoder_step` (growing self-attention cache) and `decoder_step_static` (preallocated cache).

Both take and return the cache explicitly (`in_self_kv` -> `out_self_kv`, layout [L, 2, B, H, length, hd]); nothing
is kept between calls. The static variant holds `frames` slots (300) written at `position` with no data-dependent
control flow (no If/Loop nodes), so the CUDA provider can capture it in a CUDA graph. Input order follows
docs/bundle.md: frame, position, cross_kv, in_self_kv.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgesam_train.generate import DecoderStep, EncoderCall, StaticDecoderStep
from pgesam_train.transformer import TimbreTransformer

from .manifest import GraphSpec
from .transformer_encoder import example_conditions

DYNAMIC, STATIC = "decoder_step", "decoder_step_static"
INPUTS = ["frame", "position", "cross_kv", "in_self_kv"]
OUTPUTS = ["next_frame", "out_self_kv"]


class DecoderStepGraph(nn.Module):
    """(frame (B, dim), position int64 [] = P, cross_kv (L, 2, B, H, 3, hd), in_self_kv (L, 2, B, H, P, hd))
    -> (next_frame (B, dim), out_self_kv (L, 2, B, H, P+1, hd))."""

    def __init__(self, model: TimbreTransformer):
        super().__init__()
        self.step = DecoderStep(model.eval())

    def forward(self, frame: Tensor, position: Tensor, cross_kv: Tensor, in_self_kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.step(frame, position, in_self_kv, cross_kv)


class StaticDecoderStepGraph(nn.Module):
    """(frame (B, dim), position int64 [1], cross_kv, in_self_kv (L, 2, B, H, frames, hd))
    -> (next_frame (B, dim), out_self_kv (L, 2, B, H, frames, hd) written at `position`)."""

    def __init__(self, model: TimbreTransformer):
        super().__init__()
        self.step = StaticDecoderStep(model.eval())

    def forward(self, frame: Tensor, position: Tensor, cross_kv: Tensor, in_self_kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.step(frame, position, in_self_kv, cross_kv)


def example_step_inputs(model: TimbreTransformer, batch: int, length: int, static: bool, seed: int = 0
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random inputs of one step at position `length`: frame, position, cross_kv (from the encoder), in_self_kv.

    The cache is (L, 2, B, H, length, hd), or (..., frames, hd) when `static`; frames are scaled like codec
    embeddings (the model's own normalisation).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z, pitch_index = example_conditions(model, batch, seed)
        _, cross = EncoderCall(model.eval())(z, pitch_index + cfg.pitch_min)
    frame = torch.randn(batch, cfg.dim, generator=g) * model.emb_std + model.emb_mean
    cache = torch.randn(cfg.n_decoder_layers, 2, batch, cfg.n_heads, cfg.frames if static else length, cfg.head_dim,
                        generator=g)
    position = torch.tensor([length] if static else length, dtype=torch.int64)
    return frame, position, cross, cache


def decoder_step_spec(model: TimbreTransformer, batch: int = 2, length: int = 5) -> GraphSpec:
    """The growing-cache step: batch and cache length (P in, P1 = P + 1 out) dynamic."""
    axes = {"frame": {0: "B"}, "cross_kv": {2: "B"}, "in_self_kv": {2: "B", 4: "P"}, "next_frame": {0: "B"},
            "out_self_kv": {2: "B", 4: "P1"}}
    args = example_step_inputs(model, batch, length, static=False)
    return GraphSpec(DYNAMIC, DecoderStepGraph(model), args, INPUTS, OUTPUTS, axes)


def static_decoder_step_spec(model: TimbreTransformer, batch: int = 2, length: int = 5) -> GraphSpec:
    """The preallocated-cache step: only the batch axis is dynamic (one capture per batch size)."""
    axes = {"frame": {0: "B"}, "cross_kv": {2: "B"}, "in_self_kv": {2: "B"}, "next_frame": {0: "B"},
            "out_self_kv": {2: "B"}}
    args = example_step_inputs(model, batch, length, static=True)
    return GraphSpec(STATIC, StaticDecoderStepGraph(model), args, INPUTS, OUTPUTS, axes)


def torch_reference(model: TimbreTransformer, frame: Tensor, position: Tensor, cross_kv: Tensor, in_self_kv: Tensor,
                    static: bool) -> tuple[Tensor, Tensor]:
    """The torch step the graph must match (`decode_step` or `decode_step_static`)."""
    with torch.no_grad():
        step = model.eval().decode_step_static if static else model.eval().decode_step
        return step(frame, position, in_self_kv, cross_kv)
