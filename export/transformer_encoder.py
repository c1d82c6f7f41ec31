"""Graph `transformer_encoder`: (timbre point, pitch index) -> encoder memory and every decoder layer's
cross-attention keys/values, computed once per note so that the decoder step never recomputes them.

The graph takes the pitch as an index (MIDI - pitch_min), as docs/bundle.md says; the wrapper adds pitch_min back
before calling the torch model, which embeds MIDI pitches.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgesam_train.generate import EncoderCall
from pgesam_train.transformer import TimbreTransformer

from .manifest import GraphSpec

NAME = "transformer_encoder"
INPUTS = ["z", "pitch_index"]
OUTPUTS = ["memory", "cross_kv"]


class TransformerEncoderGraph(nn.Module):
    """(z (B, 2), pitch_index (B,) int64) -> (memory (B, 3, d), cross_kv (L, 2, B, H, 3, hd))."""

    def __init__(self, model: TimbreTransformer):
        super().__init__()
        self.call = EncoderCall(model.eval())
        self.pitch_min = int(model.config.pitch_min)

    def forward(self, z: Tensor, pitch_index: Tensor) -> tuple[Tensor, Tensor]:
        return self.call(z, pitch_index + self.pitch_min)


def example_conditions(model: TimbreTransformer, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random timbre points in [-1, 1]^2 and pitch indices over the model's range: z (B, 2), pitch_index (B,)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(batch, 2, generator=g) * 2 - 1
    pitch_index = torch.randint(model.config.n_pitches, (batch,), generator=g)
    return z, pitch_index


def transformer_encoder_spec(model: TimbreTransformer, batch: int = 2) -> GraphSpec:
    """The export spec: batch dynamic; L, H, S = 3 and hd fixed by the model."""
    axes = {"z": {0: "B"}, "pitch_index": {0: "B"}, "memory": {0: "B"}, "cross_kv": {2: "B"}}
    return GraphSpec(NAME, TransformerEncoderGraph(model), example_conditions(model, batch), INPUTS, OUTPUTS, axes)


def torch_reference(model: TimbreTransformer, z: Tensor, pitch_index: Tensor) -> tuple[Tensor, Tensor]:
    """The torch computation the graph must match: `EncoderCall` on MIDI pitches."""
    with torch.no_grad():
        return EncoderCall(model.eval())(z, pitch_index + model.config.pitch_min)
