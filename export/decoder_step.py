"""Graphs `decoder_step` (growing self-attention cache) and `decoder_step_static` (preallocated cache).

Both take and return the cache explicitly, one tensor per decoder layer and per keys/values, laid out
[B, H, length, hd] as attention reads them: `in_self_k{i}`/`in_self_v{i}` -> `out_self_k{i}`/`out_self_v{i}`, with
the cross-attention `cross_k{i}`/`cross_v{i}` [B, H, S, hd] from transformer_encoder; nothing is kept between
calls. (Version 1 stacked everything into one [L, 2, B, H, P, hd] cache: stacking and splitting it in every layer
took more of the step's time in onnxruntime than its matrix products.) Attention runs as onnxruntime's
FusedMatMul (transpose and scale folded in), Softmax, MatMul. The static variant holds `frames` slots (300)
written at `position` (ScatterElements) with no data-dependent control flow (no If/Loop nodes), so the CUDA
provider can capture it in a CUDA graph. Input order follows docs/bundle.md: frame, position, cross_k0, cross_v0,
..., in_self_k0, in_self_v0, ....
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgesam_train.generate import DecoderStep, EncoderCall, cache_shape
from pgesam_train.transformer import TimbreTransformer

from .manifest import GraphSpec, cross_names, kv_cache_section, kv_metadata, self_names
from .transformer_encoder import example_conditions, flatten, pairs

DYNAMIC, STATIC = "decoder_step", "decoder_step_static"


def input_names(layers: int) -> list[str]:
    return ["frame", "position", *cross_names(layers), *self_names("in", layers)]


def output_names(layers: int) -> list[str]:
    return ["next_frame", *self_names("out", layers)]


class DecoderStepGraph(nn.Module):
    """(frame (B, dim), position int64, cross_k0, cross_v0, ... (B, H, 3, hd), in_self_k0, in_self_v0, ...
    (B, H, P, hd)) -> (next_frame (B, dim), out_self_k0, out_self_v0, ...).

    Growing cache: position [] = P, caches out have P+1 positions. static=True: position [1], caches of `frames`
    slots in and out, written at `position`.
    """

    def __init__(self, model: TimbreTransformer, static: bool = False):
        super().__init__()
        self.step = DecoderStep(model.eval(), static)
        self.layers = model.config.n_decoder_layers
        self.eval()  # a new Module starts in training mode, which the exporter would restore onto the model

    def forward(self, frame: Tensor, position: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        n = 2 * self.layers
        next_frame, self_kv = self.step(frame, position, pairs(caches[n:]), pairs(caches[:n]))
        return (next_frame, *flatten(self_kv))


def example_step_inputs(model: TimbreTransformer, batch: int, length: int, static: bool, seed: int = 0
                        ) -> tuple[Tensor, ...]:
    """Random inputs of one step at position `length`, in the graph's input order: frame, position, the cross
    keys/values (from the encoder), the self-attention caches.

    Each cache is (B, H, length, hd), or (B, H, frames, hd) when `static`; frames are scaled like codec
    embeddings (the model's own normalisation).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z, pitch_index = example_conditions(model, batch, seed)
        _, cross = EncoderCall(model.eval())(z, pitch_index + cfg.pitch_min)
    frame = torch.randn(batch, cfg.dim, generator=g) * model.emb_std + model.emb_mean
    shape = cache_shape(cfg, batch, cfg.frames if static else length)
    caches = [torch.randn(shape, generator=g) for _ in range(2 * cfg.n_decoder_layers)]
    position = torch.tensor([length] if static else length, dtype=torch.int64)
    return (frame, position, *flatten(cross), *caches)


def _spec(model: TimbreTransformer, batch: int, length: int, static: bool) -> GraphSpec:
    layers = model.config.n_decoder_layers
    axes = {"frame": {0: "B"}, "next_frame": {0: "B"}, **{n: {0: "B"} for n in cross_names(layers)}}
    axes |= {n: {0: "B"} if static else {0: "B", 2: "P"} for n in self_names("in", layers)}
    axes |= {n: {0: "B"} if static else {0: "B", 2: "P1"} for n in self_names("out", layers)}
    args = example_step_inputs(model, batch, length, static)
    return GraphSpec(STATIC if static else DYNAMIC, DecoderStepGraph(model, static), args, input_names(layers),
                     output_names(layers), axes, kv_metadata(kv_cache_section(model.config)))


def decoder_step_spec(model: TimbreTransformer, batch: int = 2, length: int = 5) -> GraphSpec:
    """The growing-cache step: batch and cache length (P in, P1 = P + 1 out) dynamic."""
    return _spec(model, batch, length, static=False)


def static_decoder_step_spec(model: TimbreTransformer, batch: int = 2, length: int = 5) -> GraphSpec:
    """The preallocated-cache step: only the batch axis is dynamic (one capture per batch size)."""
    return _spec(model, batch, length, static=True)


def torch_reference(model: TimbreTransformer, *inputs: Tensor, static: bool) -> list[Tensor]:
    """The torch step the graph must match (`decode_step` or `decode_step_static`), inputs and outputs in the
    graph's order."""
    with torch.no_grad():
        return list(DecoderStepGraph(model, static)(*inputs))
