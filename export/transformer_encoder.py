"""Graph `transformer_encoder`: (timbre point, pitch index) -> encoder memory and every decoder layer's
cross-attention keys/values, computed once per note so that the decoder step never recomputes them.

Outputs `memory` and, per decoder layer i, `cross_k{i}`, `cross_v{i}` [B, H, S, hd]: the decoder steps take them
under the same names (docs/bundle.md, manifest `kv_cache.cross`).

The graph takes the pitch as an index (MIDI - pitch_min), as docs/bundle.md says; the wrapper adds pitch_min back
before calling the torch model, which embeds MIDI pitches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pgesam_train.generate import EncoderCall
from pgesam_train.transformer import TimbreTransformer

from .manifest import GraphSpec, cross_names, kv_cache_section, kv_metadata

NAME = "transformer_encoder"
INPUTS = ["z", "pitch_index"]


def outputs(layers: int) -> list[str]:
    return ["memory", *cross_names(layers)]


class TransformerEncoderGraph(nn.Module):
    """(z (B, 2), pitch_index (B,) int64) -> (memory (B, 3, d), cross_k0, cross_v0, ... each (B, H, 3, hd))."""

    def __init__(self, model: TimbreTransformer):
        super().__init__()
        self.call = EncoderCall(model.eval())
        self.pitch_min = int(model.config.pitch_min)

    def forward(self, z: Tensor, pitch_index: Tensor) -> tuple[Tensor, ...]:
        memory, cross = self.call(z, pitch_index + self.pitch_min)
        return (memory, *flatten(cross))


def flatten(pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Per-layer (keys, values) -> [k0, v0, k1, v1, ...], the order of the graphs' cache names."""
    return [t for kv in pairs for t in kv]


def pairs(tensors: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """[k0, v0, k1, v1, ...] -> per-layer (keys, values)."""
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


def example_conditions(model: TimbreTransformer, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random timbre points in [-1, 1]^2 and pitch indices over the model's range: z (B, 2), pitch_index (B,)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(batch, 2, generator=g) * 2 - 1
    pitch_index = torch.randint(model.config.n_pitches, (batch,), generator=g)
    return z, pitch_index


def transformer_encoder_spec(model: TimbreTransformer, batch: int = 2) -> GraphSpec:
    """The export spec: batch dynamic; H, S = 3 and hd fixed by the model."""
    names = outputs(model.config.n_decoder_layers)
    axes = {"z": {0: "B"}, "pitch_index": {0: "B"}, **{name: {0: "B"} for name in names}}
    return GraphSpec(NAME, TransformerEncoderGraph(model), example_conditions(model, batch), INPUTS, names, axes,
                     kv_metadata(kv_cache_section(model.config)))


def torch_reference(model: TimbreTransformer, z: Tensor, pitch_index: Tensor) -> list[Tensor]:
    """The torch computation the graph must match, in the graph's output order: `EncoderCall` on MIDI pitches."""
    with torch.no_grad():
        memory, cross = EncoderCall(model.eval())(z, pitch_index + model.config.pitch_min)
    return [memory, *flatten(cross)]
