"""Graph `vae_encoder`: a note's codec embedding -> its point on the timbre map and its pitch.

Only the VAE's encoder and its normalisation buffers go into the graph: the decoder and the instrument / family
classifiers are training-only (RAVE habit). Dropout is off (eval mode), so the graph is deterministic.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pgesam_train.vae import VAE

from .manifest import GraphSpec

NAME = "vae_encoder"
INPUTS = ["emb"]
OUTPUTS = ["mu", "logvar", "pitch_logits"]


class VAEEncoderGraph(nn.Module):
    """emb (B, dim, frames) raw codec embedding -> mu (B, 2), logvar (B, 2), pitch_logits (B, n_pitches).

    The same computation as `VAE.encode`, on a copy of the encoder alone.
    """

    def __init__(self, vae: VAE):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder).eval().requires_grad_(False)
        self.register_buffer("emb_mean", vae.emb_mean.detach().clone())  # (1, dim, 1)
        self.register_buffer("emb_std", vae.emb_std.detach().clone())  # (1, 1, 1)

    def forward(self, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encoder((emb - self.emb_mean) / self.emb_std)


def vae_encoder_spec(vae: VAE, batch: int = 2) -> GraphSpec:
    """The export spec: batch dynamic, length fixed at the VAE's `frames` (its LayerNorms need it)."""
    cfg = vae.config
    example = torch.randn(batch, cfg.dim, cfg.frames, generator=torch.Generator().manual_seed(0))
    axes = {"emb": {0: "B"}, "mu": {0: "B"}, "logvar": {0: "B"}, "pitch_logits": {0: "B"}}
    return GraphSpec(NAME, VAEEncoderGraph(vae), (example,), INPUTS, OUTPUTS, axes)


def torch_reference(vae: VAE, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the graph must compute, straight from the torch VAE: `vae.encode(emb)` in eval mode."""
    with torch.no_grad():
        return vae.eval().encode(emb)
