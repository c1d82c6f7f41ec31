"""Stage 1 of pGESAM (Section 3.1): the timbre VAE. Modules only; the loss is in `losses.py`, the loop in
`train_vae.py`.

Encoder: Conv1d stack (stride 2) over the (dim, frames) codec embedding, dense stack, then two linear heads, each
reading its own half of the last hidden layer: mu / log sigma^2 of a 2-D timbre latent, and pitch logits. (The
authors' code puts a hidden layer of half that width in each head; with it, the KL term collapsed mu to one
point in our runs and the family / instrument losses stayed at chance.) Decoder: z (+) one-hot(argmax pitch logits, gradient stopped) -> dense stack -> ConvTranspose1d stack
back to (dim, frames). Instrument and family classifiers read mu. Every hidden layer is
Linear/Conv -> LayerNorm -> LeakyReLU -> Dropout (authors' code).

Embeddings are normalised inside the model (per-channel mean, one global std, buffers set from the training
split), so `encode` takes and `decode` returns raw codec embeddings.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.config import VAEConfig, from_dict

KIND = "vae"


def conv_lengths(frames: int, n_layers: int, kernel: int, stride: int = 2) -> list[int]:
    """Time lengths after each stride-2 conv with padding kernel//2: [frames, L1, ..., Ln]."""
    lengths = [frames]
    for _ in range(n_layers):
        lengths.append((lengths[-1] + 2 * (kernel // 2) - kernel) // stride + 1)
    return lengths


class DenseStack(nn.Module):
    """Linear -> LayerNorm -> LeakyReLU -> Dropout per hidden width; an optional plain Linear output layer."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int | None, slope: float, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.LayerNorm(width), nn.LeakyReLU(slope), nn.Dropout(dropout)]
            n_in = width
        if n_out is not None:
            layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """(B, dim, frames) normalised embedding -> mu (B, 2), logvar (B, 2), pitch_logits (B, n_pitches)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        lengths = conv_lengths(cfg.frames, len(cfg.conv_channels), cfg.kernel)
        layers: list[nn.Module] = []
        c_in = cfg.dim
        for c_out, t_out in zip(cfg.conv_channels, lengths[1:]):
            layers += [nn.Conv1d(c_in, c_out, cfg.kernel, stride=2, padding=cfg.kernel // 2),
                       nn.LayerNorm([c_out, t_out]), nn.LeakyReLU(cfg.negative_slope), nn.Dropout(cfg.dropout)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.dense = DenseStack(c_in * lengths[-1], cfg.enc_dense, None, cfg.negative_slope, cfg.dropout)
        self.split = cfg.enc_dense[-1] // 2  # first half -> timbre head, second half -> pitch head
        self.timbre_head = nn.Linear(self.split, 2 * cfg.latent_dim)
        self.pitch_head = nn.Linear(cfg.enc_dense[-1] - self.split, cfg.n_pitches)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.convs(x)  # (B, C_last, T_last)
        h = self.dense(h.flatten(1))  # (B, H)
        mu, logvar = self.timbre_head(h[:, :self.split]).chunk(2, dim=1)  # (B, 2) each
        return mu, logvar, self.pitch_head(h[:, self.split:])  # ..., (B, n_pitches)


class Decoder(nn.Module):
    """z (B, 2) (+) pitch one-hot (B, n_pitches) -> (B, dim, frames) normalised embedding."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        lengths = conv_lengths(cfg.frames, len(cfg.conv_channels), cfg.kernel)[::-1]  # [T_last, ..., frames]
        self.c0, self.t0 = cfg.conv_channels[-1], lengths[0]
        # the dense stack ends with a projection to the shape the deconvs start from (authors' code)
        widths = tuple(cfg.dec_dense) + (self.c0 * self.t0,)
        self.dense = DenseStack(cfg.latent_dim + cfg.n_pitches, widths, None, cfg.negative_slope, cfg.dropout)
        layers: list[nn.Module] = []
        c_in, n = self.c0, len(cfg.deconv_channels)
        for i, (c_out, t_in, t_out) in enumerate(zip(cfg.deconv_channels, lengths[:-1], lengths[1:])):
            # output_padding makes each layer the exact mirror of the encoder's (e.g. 10 -> 19 -> 38 -> 75 ...)
            pad = cfg.kernel // 2
            out_pad = t_out - ((t_in - 1) * 2 - 2 * pad + cfg.kernel)
            layers.append(nn.ConvTranspose1d(c_in, c_out, cfg.kernel, stride=2, padding=pad, output_padding=out_pad))
            if i < n - 1:  # the output layer stays linear
                layers += [nn.LayerNorm([c_out, t_out]), nn.LeakyReLU(cfg.negative_slope), nn.Dropout(cfg.dropout)]
            c_in = c_out
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor, pitch_onehot: Tensor) -> Tensor:
        h = self.dense(torch.cat([z, pitch_onehot], dim=1))  # (B, C_last * T_last)
        h = h.view(-1, self.c0, self.t0)  # (B, C_last, T_last)
        return self.deconvs(h)  # (B, dim, frames)


class VAE(nn.Module):
    """The timbre VAE with its pitch head and its instrument / family classifiers on mu."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.n_instruments < 1:
            raise ValueError("VAEConfig.n_instruments must be set to the number of training instruments")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        slope = config.negative_slope
        self.inst_classifier = DenseStack(config.latent_dim, config.inst_hidden, config.n_instruments, slope, 0.0)
        self.fam_classifier = DenseStack(config.latent_dim, config.fam_hidden, config.n_families, slope, 0.0)
        self.register_buffer("emb_mean", torch.zeros(1, config.dim, 1))  # (1, dim, 1)
        self.register_buffer("emb_std", torch.ones(1, 1, 1))  # (1, 1, 1)

    @torch.no_grad()
    def set_normalization(self, mean: Tensor, std: float) -> None:
        """Per-channel mean (dim,) and one global std of the training embeddings."""
        if std <= 0:
            raise ValueError(f"embedding std must be positive, got {std}")
        self.emb_mean.copy_(mean.reshape(1, -1, 1))
        self.emb_std.fill_(float(std))

    def normalize(self, emb: Tensor) -> Tensor:
        return (emb - self.emb_mean) / self.emb_std

    def encode(self, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """emb (B, dim, frames) raw codec embedding -> mu (B, 2), logvar (B, 2), pitch_logits (B, n_pitches)."""
        return self.encoder(self.normalize(emb.float()))

    def decode(self, z: Tensor, pitch_onehot: Tensor) -> Tensor:
        """z (B, 2), pitch_onehot (B, n_pitches) -> raw codec embedding (B, dim, frames)."""
        return self.decoder(z, pitch_onehot) * self.emb_std + self.emb_mean

    def pitch_onehot(self, pitch_logits: Tensor) -> Tensor:
        """One-hot of the argmax pitch class, gradient stopped: (B, n_pitches) -> (B, n_pitches)."""
        return F.one_hot(pitch_logits.detach().argmax(dim=1), self.config.n_pitches).float()

    def forward(self, emb: Tensor) -> dict[str, Tensor]:
        """emb (B, dim, frames) -> mu, logvar, z (B, 2); pitch_logits (B, 25); recon (B, dim, frames);
        inst_logits (B, n_instruments); fam_logits (B, n_families). z is sampled in training mode and is mu
        in eval mode."""
        out = self.forward_normalized(self.normalize(emb.float()))
        out["recon"] = out["recon"] * self.emb_std + self.emb_mean
        return out

    def forward_normalized(self, x: Tensor) -> dict[str, Tensor]:
        """`forward` on a normalised embedding x (B, dim, frames); "recon" is normalised too (training uses
        this to skip a de-normalise / re-normalise round trip)."""
        mu, logvar, pitch_logits = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = self.decoder(z, self.pitch_onehot(pitch_logits))  # (B, dim, frames), normalised
        return {"mu": mu, "logvar": logvar, "z": z, "pitch_logits": pitch_logits, "recon": recon,
                "inst_logits": self.inst_classifier(mu), "fam_logits": self.fam_classifier(mu)}


def load_vae(path: Path) -> tuple[VAE, dict]:
    """Rebuild a VAE from its checkpoint: (model in eval mode, the checkpoint's "extra")."""
    state = load_checkpoint(path, KIND)
    model = VAE(from_dict(VAEConfig, state["config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state["extra"]
