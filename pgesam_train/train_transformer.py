"""Training loop of the Stage-2 Transformer: teacher-forced next-frame MSE, conditioned on z~ from the frozen VAE.

Per note and step, as in Section 3.2: z~ = mu + sigma * eps * beta (beta = `z_noise`, 0.01), with mu and sigma
the frozen VAE's posterior of that note (computed once at start). The decoder input is <BOS> (zeros) followed by
frames 0..T-2, with Gaussian noise of std `input_noise` (beyond the paper; see `teacher_forced_loss`); the target
is frames 0..T-1. AdamW (0.9, 0.95) with linear warm-up and cosine decay.

Outputs in `out_dir`: transformer.pt (latest; kind "transformer"; extra = VAE and latent cache it was trained on,
codec identity, best validation loss), transformer-best.pt (lowest validation loss), steps.csv, valid.csv.

Resuming is exact: step s draws its notes, noise and dropout from generators seeded by (seed, s), so an
interrupted run continues with the same batches as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import file_sha256, load_checkpoint, save_checkpoint
from .config import TransformerConfig, from_dict, to_dict
from .data.latents import LatentCacheError, Latents, load_latents
from .train_vae import embedding_stats
from .training import CSVLog, seed_everything, set_threads
from .transformer import KIND, TimbreTransformer
from .vae import VAE, load_vae

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "transformer.pt"
BEST_NAME = "transformer-best.pt"


@dataclass
class NoteSet:
    """One split ready for Stage 2: frames (N, T, dim) float16, VAE posterior mu/sigma (N, 2), MIDI pitch (N,)."""
    frames: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    pitch: torch.Tensor

    def __len__(self) -> int:
        return len(self.pitch)

    def batch(self, idx: torch.Tensor, eps: torch.Tensor, beta: float, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows idx (B,) with noise eps (B, 2) -> z~ (B, 2), pitch (B,), frames (B, T, dim) float32 on device."""
        z = self.mu[idx] + self.sigma[idx] * eps * beta
        return z.to(device), self.pitch[idx].to(device), self.frames[idx].float().to(device)


@torch.no_grad()
def vae_posterior(vae: VAE, emb: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and sigma (N, 2) of (N, dim, frames) embeddings under the frozen VAE (eval mode)."""
    vae.eval()
    mus, sigmas = [], []
    for s in range(0, len(emb), batch_size):
        mu, logvar, _ = vae.encode(torch.from_numpy(np.asarray(emb[s:s + batch_size], dtype=np.float32)))
        mus.append(mu)
        sigmas.append(torch.exp(0.5 * logvar))
    return torch.cat(mus), torch.cat(sigmas)


def note_set(lat: Latents, vae: VAE, cfg: TransformerConfig) -> NoteSet:
    """Check a split against the config and encode it with the VAE."""
    if lat.emb.shape[1:] != (cfg.dim, cfg.frames):
        raise ValueError(f"latent cache rows are {lat.emb.shape[1:]}, the Transformer expects ({cfg.dim}, "
                         f"{cfg.frames})")
    lo, hi = cfg.pitch_min, cfg.pitch_min + cfg.n_pitches - 1
    if len(lat) and (lat.pitch.min() < lo or lat.pitch.max() > hi):
        raise ValueError(f"latent cache has MIDI pitches {lat.pitch.min()}-{lat.pitch.max()}, the model covers "
                         f"{lo}-{hi}; rebuild the dataset with that range")
    mu, sigma = vae_posterior(vae, lat.emb)
    frames = torch.from_numpy(np.ascontiguousarray(np.asarray(lat.emb, dtype=np.float16).transpose(0, 2, 1)))
    return NoteSet(frames, mu, sigma, torch.from_numpy(lat.pitch.astype(np.int64)))


def teacher_forced_loss(model: TimbreTransformer, z: torch.Tensor, pitch: torch.Tensor,
                        frames: torch.Tensor, input_noise: float = 0.0,
                        generator: torch.Generator | None = None, weights: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """MSE of next-frame predictions in normalised units; frames (B, T, dim) are the targets.

    `weights` (dim,) weighs each embedding dim's squared error (see `dim_weights`); None is the plain mean.

    `input_noise` > 0 adds Gaussian noise of that std (in units of the embedding std) to the decoder's input
    frames, not to <BOS> nor to the targets: at 75 frames/s the next frame is close to a copy of the last one, and
    clean inputs teach the decoder to copy rather than to use its pitch/timbre conditioning, which free-running
    generation then pays for (exposure bias).
    """
    inputs = frames[:, :-1]
    if input_noise > 0:
        noise = torch.randn(inputs.shape, generator=generator).to(inputs.device)
        inputs = inputs + noise * (input_noise * model.emb_std)
    bos = torch.zeros_like(frames[:, :1])
    pred = model(z, pitch, torch.cat([bos, inputs], dim=1))  # (B, T, dim)
    err = ((pred - frames) / model.emb_std) ** 2
    if weights is not None:
        return torch.mean(err * weights) / torch.mean(weights)
    return torch.mean(err)


def dim_weights(cfg: TransformerConfig) -> torch.Tensor | None:
    """Per-dim loss weights: `low_dims_weight` on the first `low_dims` dims, 1 elsewhere (None when off).

    Beyond the paper. With the mel-encoder codecs the first dims are the lowest mel bands, where a semitone is a
    fraction of one band (26 Hz apart below 1 kHz; a semitone at MIDI 48 is 8 Hz), so the plain MSE hardly
    notices a note a semitone flat or an octave-weak fundamental; weighting them makes it notice. The weights are
    normalised to mean 1, so the loss stays in the same units. (The config refuses bad values.)
    """
    if cfg.low_dims == 0 or cfg.low_dims_weight == 1.0:
        return None
    w = torch.ones(cfg.dim)
    w[:cfg.low_dims] = cfg.low_dims_weight
    return w


def lr_at(cfg: TransformerConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rewarm_factor(cfg: TransformerConfig, step: int, rewarm_from: int | None) -> float:
    """LR multiplier after a resume that had no optimizer state (fresh Adam moments): a linear ramp over
    warmup_steps // 4 steps from `rewarm_from`, so the first updates do not jolt a trained model."""
    if rewarm_from is None:
        return 1.0
    ramp = max(1, cfg.warmup_steps // 4)
    return min(1.0, (step - rewarm_from + 1) / ramp)


def build_optimizer(model: TimbreTransformer, cfg: TransformerConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on matrices only (nanoGPT's grouping)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _step_generator(cfg: TransformerConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def train_step(model: TimbreTransformer, opt: torch.optim.Optimizer, data: NoteSet, cfg: TransformerConfig,
               step: int, device: torch.device | str, lr: float, weights: torch.Tensor | None = None) -> float:
    """One optimiser step at learning rate `lr` on a batch drawn by (seed, step), with per-dim loss `weights`
    (`dim_weights`, on `device`); returns the loss."""
    g = _step_generator(cfg, step)
    idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
    batch = data.batch(idx, torch.randn(cfg.batch_size, 2, generator=g), cfg.z_noise, device)
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks
    for group in opt.param_groups:
        group["lr"] = lr
    loss = teacher_forced_loss(model, *batch, cfg.input_noise, g, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model: TimbreTransformer, data: NoteSet, cfg: TransformerConfig, device: torch.device | str) -> float:
    """Teacher-forced loss over cfg.val_batches fixed batches (same notes and noise every time)."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.val_batches):
        idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=g)
        batch = data.batch(idx, torch.randn(len(idx), 2, generator=g), cfg.z_noise, device)
        losses.append(float(teacher_forced_loss(model, *batch)))
    model.train()
    return float(np.mean(losses))


# training fields a resumed run takes from the command, not from the checkpoint it continues
RESUME_OVERRIDES = ("steps", "input_noise", "low_dims", "low_dims_weight", "lr", "min_lr_ratio")


def _start(cfg: TransformerConfig, ckpt: Path, resume: bool, train_emb: np.ndarray
           ) -> tuple[TimbreTransformer, dict | None]:
    """A fresh model (normalised on the training split) or, with resume, the one in `ckpt`, its architecture
    and the RESUME_OVERRIDES fields of `cfg`."""
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt, KIND)
        stored = from_dict(TransformerConfig, state["config"])
        model = TimbreTransformer(dataclasses.replace(stored, **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}))
        model.load_state_dict(state["model"])
        return model, state
    if resume:
        log.warning("no checkpoint at %s to resume; starting afresh", ckpt)
    model = TimbreTransformer(cfg)
    model.set_normalization(*embedding_stats(train_emb))
    return model, None


def _load_valid(cache_dir: Path, vae: VAE, cfg: TransformerConfig) -> NoteSet | None:
    try:
        return note_set(load_latents(cache_dir, "valid"), vae, cfg)
    except LatentCacheError as e:
        log.warning("no validation: %s", e)
        return None


def train_transformer(cfg: TransformerConfig, cache_dir: Path, vae_path: Path, out_dir: Path,
                      resume: bool = False, threads: int | None = None, device: str = "cpu",
                      stop_after: int | None = None) -> Path:
    """Train (or resume) the Transformer on latent cache `cache_dir` with the frozen VAE at `vae_path`.

    `stop_after` ends this session (checkpointed) after that step, to continue later with `resume`: the schedule
    still runs to cfg.steps. Returns the path of the latest checkpoint (out_dir/transformer.pt).
    """
    set_threads(threads)
    seed_everything(cfg.seed)
    out_dir, ckpt = Path(out_dir), Path(out_dir) / CHECKPOINT_NAME
    vae, _ = load_vae(vae_path)
    train_lat = load_latents(cache_dir, "train")
    model, state = _start(cfg, ckpt, resume, train_lat.emb)
    cfg = model.config
    train, valid = note_set(train_lat, vae, cfg), _load_valid(cache_dir, vae, cfg)
    model.to(device).train()
    weights = dim_weights(cfg)
    weights = None if weights is None else weights.to(device)
    opt = build_optimizer(model, cfg)
    step, extra = 0, {"vae": str(vae_path), "vae_sha256": file_sha256(vae_path), "latents": str(cache_dir),
                      "codec": train_lat.meta.get("codec"), "best_valid": float("inf")}
    if state is not None:
        same_map = state["extra"].get("vae_sha256") == extra["vae_sha256"]
        if not same_map:  # continued on another VAE's map: validation losses on the old map do not compare
            log.info("%s was trained on the map of another VAE than %s: its best validation loss starts afresh",
                     ckpt, vae_path)
        best = state["extra"].get("best_valid", float("inf")) if same_map else float("inf")
        step, extra = state["step"], {**extra, "best_valid": best, "rewarm_from": state["extra"].get("rewarm_from")}
        if state.get("optimizer"):
            opt.load_state_dict(state["optimizer"])
        else:  # shipped checkpoints carry none (`checkpoint.without_optimizer`)
            extra["rewarm_from"] = step
            log.info("no optimizer state in %s: fresh moments, learning rate re-warmed from step %d", ckpt, step)
    log.info("transformer %s params, %d train notes, steps %d -> %d", f"{model.num_params():,}", len(train), step,
             cfg.steps)
    steps_log, valid_log = CSVLog(out_dir / "steps.csv"), CSVLog(out_dir / "valid.csv")
    t0, recent = time.time(), []
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        lr = lr_at(cfg, step) * rewarm_factor(cfg, step, extra.get("rewarm_from"))
        recent.append(train_step(model, opt, train, cfg, step, device, lr, weights))
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            steps_log.write(step=step, lr=lr, loss=float(np.mean(recent)),
                            seconds=round(time.time() - t0, 2))
            log.info("step %d/%d loss %.5f (%.2f s/step)", step, cfg.steps, np.mean(recent),
                     (time.time() - t0) / len(recent))
            t0, recent = time.time(), []
        if step % cfg.val_every == 0 or step == end:
            extra = _checkpoint(model, opt, cfg, step, valid, device, extra, valid_log, out_dir)
    return ckpt


def _checkpoint(model: TimbreTransformer, opt: torch.optim.Optimizer, cfg: TransformerConfig, step: int,
                valid: NoteSet | None, device: torch.device | str, extra: dict, valid_log: CSVLog,
                out_dir: Path) -> dict:
    """Validate, write transformer.pt (and transformer-best.pt on a new best); returns the updated extra."""
    v = validate(model, valid, cfg, device) if valid is not None else float("nan")
    best = v < extra["best_valid"]
    extra = {**extra, "best_valid": v if best else extra["best_valid"], "valid_loss": v}
    valid_log.write(step=step, valid_loss=v)
    log.info("step %d valid loss %.5f%s", step, v, " (best)" if best else "")
    save_checkpoint(out_dir / CHECKPOINT_NAME, KIND, to_dict(cfg), model, opt, step=step, extra=extra)
    if best:
        save_checkpoint(out_dir / BEST_NAME, KIND, to_dict(cfg), model, None, step=step, extra=extra)
    return extra
