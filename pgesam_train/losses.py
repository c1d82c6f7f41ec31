"""The VAE loss of the paper (Eq. 1-8), one function per term, and their scheduled combination.

All functions take minibatch tensors; B is the minibatch size N of the paper. Where the authors' public code
differs from the paper, the paper is our spec (see `VAELossConfig`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pgesam_train.config import VAELossConfig

TERMS = ("rec", "kl", "reg", "nei", "pitch", "inst", "fam")


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Eq. 2: mean squared error, averaged over the batch and every element of the (dim, frames) embedding."""
    return F.mse_loss(recon, target)


def kl_loss(mu: Tensor, logvar: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 3: 1/2 sum_i (mu^2 + sigma^2 - log sigma^2 - 1) over the latent axes, then over the batch.

    Args: mu, logvar (B, latent_dim); reduction "mean" (divide by B, as the authors' code does) or "sum" (Eq. 3
    as printed, no 1/N). With "sum", beta_kl = 0.0039 ~ 1/256 weighs each sample's KL about 1 at batch 256, and
    on our data that collapsed every mu onto the origin within a few epochs (posterior collapse: the family and
    instrument losses stayed at chance), so "mean" is the default; see VAELossConfig.kl_reduction.
    """
    per_sample = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)  # (B,)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"kl reduction must be 'mean' or 'sum', not {reduction!r}")


def regularization_loss(mu: Tensor) -> Tensor:
    """Eq. 4: mean over the batch of max(0, ||mu_i|| - 1): keeps mu (B, 2) inside the unit circle."""
    return F.relu(mu.norm(dim=1) - 1.0).mean()


def _pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """S_ij (same class) and 1 - S_ij over the pairs j != i, both (B, B) float."""
    same = (labels[:, None] == labels[None, :]).float()
    off_diag = 1.0 - torch.eye(len(labels), device=labels.device)
    return same * off_diag, (1.0 - same) * off_diag


def _squared_distances(mu: Tensor) -> Tensor:
    """d_ij^2 = ||mu_i - mu_j||^2 as (B, B); exact zeros on the diagonal."""
    diff = mu[:, None, :] - mu[None, :, :]  # (B, B, 2)
    return diff.pow(2).sum(-1)


def attractive_loss(mu: Tensor, labels: Tensor, eps: float = 1e-6) -> Tensor:
    """Eq. 6: sum_{i != j} S_ij d_ij^2 / (sum_{i != j} S_ij + eps). mu (B, 2), labels (B,) instrument class."""
    same, _ = _pair_masks(labels)
    return (same * _squared_distances(mu)).sum() / (same.sum() + eps)


def repulsive_loss(mu: Tensor, labels: Tensor, margin: float = 0.25, eps: float = 1e-6) -> Tensor:
    """Eq. 7: sum_{i != j} (1 - S_ij) max(0, M - d_ij)^2 / (sum_{i != j} (1 - S_ij) + eps).

    d_ij is taken as sqrt(d_ij^2 + 1e-12) so that two coinciding points of different classes get a finite
    gradient (sqrt has none at 0); the value moves by at most 1e-6.
    """
    _, diff = _pair_masks(labels)
    d = (_squared_distances(mu) + 1e-12).sqrt()
    return (diff * F.relu(margin - d).pow(2)).sum() / (diff.sum() + eps)


def neighbour_loss(mu: Tensor, labels: Tensor, margin: float = 0.25, eps: float = 1e-6) -> Tensor:
    """Eq. 5: attractive (Eq. 6) + repulsive (Eq. 7) on the latent means of one minibatch.
    Unlike the authors' code (which keeps the diagonal), pairs j == i are excluded as the paper writes."""
    return attractive_loss(mu, labels, eps) + repulsive_loss(mu, labels, margin, eps)


def classification_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Eq. 8: cross-entropy -1/N sum_i log softmax(logits_i)[target_i]. logits (B, C), target (B,) class index."""
    return F.cross_entropy(logits, target)


def term_weights(cfg: VAELossConfig, gamma: float) -> dict[str, float]:
    """The factor in front of each term of Eq. 1 at training progress gamma = epoch / N_epochs in [0, 1];
    0 for a term switched off."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma = epoch / N_epochs must be in [0, 1], got {gamma}")
    w = {"rec": cfg.beta_rec, "kl": cfg.beta_kl, "reg": cfg.beta_reg,
         "nei": cfg.beta_nei * gamma ** cfg.alpha_nei, "pitch": cfg.beta_pitch,
         "inst": cfg.beta_inst * gamma ** cfg.alpha_inst,
         "fam": cfg.beta_fam * (1.0 - gamma) ** cfg.alpha_fam}  # paper; authors' code: 1 - gamma^alpha_fam
    return {k: v if getattr(cfg, f"use_{k}") else 0.0 for k, v in w.items()}


def loss_terms(out: dict[str, Tensor], emb_norm: Tensor, recon_norm: Tensor, pitch: Tensor, inst: Tensor,
               fam: Tensor, cfg: VAELossConfig, with_inst: bool = True) -> dict[str, Tensor]:
    """The unweighted terms of Eq. 1 for one minibatch.

    Args:
        out: `VAE.forward` output (mu, logvar, pitch_logits, inst_logits, fam_logits).
        emb_norm, recon_norm: target and reconstruction (B, dim, frames), both normalised by the model.
        pitch: (B,) pitch class; inst: (B,) instrument label (class index when with_inst, any id otherwise);
        fam: (B,) family 0..10.
        with_inst: False for notes of instruments the classifier has no class for (valid / test splits).
    """
    terms = {"rec": reconstruction_loss(recon_norm, emb_norm),
             "kl": kl_loss(out["mu"], out["logvar"], cfg.kl_reduction),
             "reg": regularization_loss(out["mu"]), "nei": neighbour_loss(out["mu"], inst, cfg.margin, cfg.eps),
             "pitch": classification_loss(out["pitch_logits"], pitch),
             "fam": classification_loss(out["fam_logits"], fam)}
    if with_inst:
        terms["inst"] = classification_loss(out["inst_logits"], inst)
    return terms


def vae_loss(terms: dict[str, Tensor], cfg: VAELossConfig, gamma: float) -> Tensor:
    """Eq. 1: the weighted, scheduled sum of the terms present in `terms`."""
    weights = term_weights(cfg, gamma)
    total = sum((weights[k] * v for k, v in terms.items() if weights[k] != 0.0),
                start=torch.zeros((), device=next(iter(terms.values())).device))
    return total
