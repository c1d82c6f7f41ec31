"""Training loop of the stage-1 VAE: minibatches of the latent cache, Eq. 1 with its gamma schedules, per-term
CSV logs, validation each epoch, checkpoint + resume, and the timbre map written at the end.

Outputs in `out_dir`: vae.pt (kind "vae"; extra = instrument class table, latent cache and codec, timbre map),
vae_map.json (the map alone, for the engine), steps.csv (raw loss terms per step), epochs.csv (epoch means of
train and valid terms, valid pitch accuracy).

Resuming is exact: each epoch reseeds torch from (seed, epoch) and draws its own permutation, so an
interrupted run continues with the same batches, dropout masks and gamma as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pgesam_train.checkpoint import load_checkpoint, save_checkpoint
from pgesam_train.config import VAEConfig, from_dict, to_dict
from pgesam_train.data.latents import LatentCacheError, Latents, load_latents
from pgesam_train.data.nsynth import FAMILIES
from pgesam_train.losses import TERMS, loss_terms, vae_loss
from pgesam_train.training import CSVLog, seed_everything, set_threads
from pgesam_train.vae import KIND, VAE

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "vae.pt"


def map_json_path(checkpoint: Path) -> Path:
    """Where the timbre map of a checkpoint is written as JSON: next to it, `<stem>_map.json`."""
    return Path(checkpoint).with_name(f"{Path(checkpoint).stem}_map.json")


def pitch_classes(pitch: np.ndarray, cfg: VAEConfig) -> np.ndarray:
    """MIDI pitches (N,) -> class indices 0..n_pitches-1, with an error naming the offending range."""
    cls = pitch.astype(np.int64) - cfg.pitch_min
    if len(cls) and (cls.min() < 0 or cls.max() >= cfg.n_pitches):
        raise ValueError(f"latent cache has MIDI pitches {pitch.min()}-{pitch.max()}, the VAE covers "
                         f"{cfg.pitch_min}-{cfg.pitch_min + cfg.n_pitches - 1}; rebuild the dataset with that range")
    return cls


def class_table(lat: Latents) -> list[dict]:
    """One entry per training instrument, sorted by name: instrument_str, instrument (dataset id), family, class."""
    first: dict[str, int] = {}
    for i, name in enumerate(lat.instrument_str):
        first.setdefault(name, i)
    return [{"instrument_str": name, "instrument": int(lat.instrument[i]), "family": int(lat.family[i]), "class": c}
            for c, (name, i) in enumerate(sorted(first.items()))]


@dataclass
class SplitData:
    """The arrays one split needs for training: emb stays memory-mapped; labels are (N,) int64.
    `inst` holds classifier classes for the training split and raw dataset instrument ids otherwise."""
    emb: np.ndarray
    pitch: np.ndarray
    inst: np.ndarray
    family: np.ndarray
    with_inst: bool

    def __len__(self) -> int:
        return len(self.pitch)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Rows idx (sorted for memmap locality) -> emb (B, dim, frames) float32 and the (B,) labels."""
        idx = np.sort(idx)
        return (torch.from_numpy(np.asarray(self.emb[idx], dtype=np.float32)), torch.from_numpy(self.pitch[idx]),
                torch.from_numpy(self.inst[idx]), torch.from_numpy(self.family[idx]))


def split_data(lat: Latents, cfg: VAEConfig, classes: list[dict] | None) -> SplitData:
    """Labels for one split; with `classes` the instruments are mapped to classifier classes."""
    if lat.emb.shape[1:] != (cfg.dim, cfg.frames):
        raise ValueError(f"latent cache rows are {lat.emb.shape[1:]}, the VAE expects ({cfg.dim}, {cfg.frames})")
    if classes is None:
        inst = lat.instrument.astype(np.int64)
    else:
        index = {c["instrument_str"]: c["class"] for c in classes}
        unknown = sorted(set(lat.instrument_str) - set(index))
        if unknown:
            raise ValueError(f"the training split has instruments the checkpoint has no class for ({unknown[:3]}...): "
                             "it was trained on another latent cache; choose another --out")
        inst = np.array([index[s] for s in lat.instrument_str], dtype=np.int64)
    return SplitData(lat.emb, pitch_classes(lat.pitch, cfg), inst, lat.family.astype(np.int64), classes is not None)


def embedding_stats(emb: np.ndarray, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """Per-channel mean (dim,) and one global std of (N, dim, frames) embeddings, read in chunks."""
    n, total, sq = len(emb), 0.0, 0.0
    mean = np.zeros(emb.shape[1])
    for s in range(0, n, chunk):
        mean += np.asarray(emb[s:s + chunk], dtype=np.float64).sum(axis=(0, 2))
    mean /= n * emb.shape[2]
    for s in range(0, n, chunk):
        x = np.asarray(emb[s:s + chunk], dtype=np.float64) - mean[None, :, None]
        sq += float((x * x).sum())
        total += x.size
    return torch.from_numpy(mean).float(), max(float(np.sqrt(sq / total)), 1e-6)


def run_batch(model: VAE, data: SplitData, idx: np.ndarray, gamma: float) -> tuple[torch.Tensor, dict, dict]:
    """Forward one minibatch: (Eq. 1 total, the raw terms, the model output)."""
    emb, pitch, inst, fam = data.batch(idx)
    x = model.normalize(emb)  # (B, dim, frames)
    out = model.forward_normalized(x)
    terms = loss_terms(out, x, out["recon"], pitch, inst, fam, model.config.loss, with_inst=data.with_inst)
    return vae_loss(terms, model.config.loss, gamma), terms, out


def learning_rate(cfg: VAEConfig, progress: float) -> float:
    """cfg.lr decayed along a half cosine to cfg.lr * cfg.lr_final at progress 1 (epochs done / cfg.epochs)."""
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train_epoch(model: VAE, opt: torch.optim.Optimizer, data: SplitData, epoch: int, step: int,
                steps_log: CSVLog, progress: bool) -> tuple[dict[str, float], int]:
    """One pass over the training split; returns the epoch means of the terms and the new step count."""
    cfg = model.config
    gamma = epoch / cfg.epochs
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data))
    batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    sums: dict[str, float] = {}
    model.train()
    for i, idx in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                                 leave=False)):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, (epoch + i / len(batches)) / cfg.epochs)
        total, terms, _ = run_batch(model, data, idx, gamma)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        row = {"total": total.item(), **{k: v.item() for k, v in terms.items()}}
        steps_log.write(epoch=epoch, step=step, gamma=gamma, **row)
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx)
    return {k: v / len(data) for k, v in sums.items()}, step


@torch.no_grad()
def validate(model: VAE, data: SplitData, gamma: float) -> dict[str, float]:
    """Epoch means of the terms on a held-out split (no instrument term: unseen instruments) and pitch accuracy."""
    model.eval()
    sums: dict[str, float] = {}
    for s in range(0, len(data), model.config.batch_size):
        idx = np.arange(s, min(s + model.config.batch_size, len(data)))
        total, terms, out = run_batch(model, data, idx, gamma)
        acc = (out["pitch_logits"].argmax(1).numpy() == data.pitch[idx]).mean()
        row = {"total": total.item(), **{k: v.item() for k, v in terms.items()}, "pitch_acc": float(acc)}
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx)
    return {k: v / len(data) for k, v in sums.items()}


def _start(cfg: VAEConfig, train: Latents, ckpt: Path, resume: bool) -> tuple[VAE, list[dict], dict | None]:
    """A fresh model (normalised on the training split) or the one stored in `ckpt` when resuming."""
    if ckpt.is_file() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt, KIND)
        stored = from_dict(VAEConfig, state["config"])
        if dataclasses.replace(stored, epochs=cfg.epochs, n_instruments=0) != cfg:
            raise ValueError(f"{ckpt} was trained with another VAE config than the one asked for; "
                             "resume with the same --preset (only --epochs may change)")
        model = VAE(dataclasses.replace(stored, epochs=cfg.epochs))
        model.load_state_dict(state["model"])
        return model, state["extra"]["classes"], state
    classes = class_table(train)
    model = VAE(dataclasses.replace(cfg, n_instruments=len(classes)))
    model.set_normalization(*embedding_stats(train.emb))
    return model, classes, None


def _optimizer(model: VAE) -> torch.optim.Optimizer:
    cfg = model.config
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)


def _load_valid(cache_dir: Path, cfg: VAEConfig) -> SplitData | None:
    try:
        return split_data(load_latents(cache_dir, "valid"), cfg, None)
    except LatentCacheError as e:
        log.warning("no validation: %s", e)
        return None


def train_vae(cfg: VAEConfig, cache_dir: Path, out_dir: Path, resume: bool = False, threads: int | None = None,
              progress: bool = True) -> Path:
    """Train (or resume) a VAE on the latent cache `cache_dir`; returns the checkpoint path.

    Args:
        cfg: a preset (n_instruments is set from the training split); `cfg.epochs` may differ on resume.
        out_dir: receives vae.pt, vae_map.json, steps.csv, epochs.csv.
        resume: continue the checkpoint in out_dir (epoch count and gamma schedule continue).
    """
    set_threads(threads)
    seed_everything(cfg.seed)
    out_dir, ckpt = Path(out_dir), Path(out_dir) / CHECKPOINT_NAME
    train_lat = load_latents(cache_dir, "train")
    model, classes, state = _start(cfg, train_lat, ckpt, resume)
    cfg = model.config
    train, valid = split_data(train_lat, cfg, classes), _load_valid(cache_dir, cfg)
    opt = _optimizer(model)
    epoch, step = 0, 0
    if state is not None:
        if state.get("optimizer"):  # shipped checkpoints carry none (`checkpoint.without_optimizer`)
            opt.load_state_dict(state["optimizer"])
        epoch, step = state["epoch"], state["step"]
    extra = {"classes": classes, "latents": str(cache_dir), "codec": train_lat.meta.get("codec")}
    steps_log, epochs_log = CSVLog(out_dir / "steps.csv"), CSVLog(out_dir / "epochs.csv")
    for epoch in range(epoch, cfg.epochs):
        t0 = time.time()
        means, step = train_epoch(model, opt, train, epoch, step, steps_log, progress)
        row = {f"train_{k}": means.get(k, "") for k in ("total",) + TERMS}
        if valid is not None:
            v = validate(model, valid, epoch / cfg.epochs)
            row.update({f"valid_{k}": v.get(k, "") for k in ("total",) + TERMS + ("pitch_acc",)})
        epochs_log.write(epoch=epoch + 1, step=step, gamma=epoch / cfg.epochs, seconds=time.time() - t0, **row)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, {k: round(float(x), 5) for k, x in row.items() if x != ""})
        save_checkpoint(ckpt, KIND, to_dict(cfg), model, opt, step=step, epoch=epoch + 1, extra=extra)
    return finish(model, train_lat, classes, extra, ckpt, opt, step)


def finish(model: VAE, train_lat: Latents, classes: list[dict], extra: dict, ckpt: Path,
           opt: torch.optim.Optimizer | None, step: int) -> Path:
    """Compute the timbre map on the training split, store it in the checkpoint's extra and as JSON beside it."""
    extra = {**extra, "map": timbre_map(model, train_lat, classes)}
    save_checkpoint(ckpt, KIND, to_dict(model.config), model, opt, step=step, epoch=model.config.epochs,
                    extra=extra)
    map_json_path(ckpt).write_text(json.dumps(extra["map"], indent=1))
    return ckpt


@torch.no_grad()
def latent_means(model: VAE, emb: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """mu of every row of (N, dim, frames) embeddings, in eval mode: (N, 2) float64."""
    model.eval()
    out = [model.encode(torch.from_numpy(np.asarray(emb[s:s + batch_size], dtype=np.float32)))[0].double().numpy()
           for s in range(0, len(emb), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.config.latent_dim))


def timbre_map(model: VAE, lat: Latents, classes: list[dict], mu: np.ndarray | None = None) -> dict:
    """The engine's map: the centroid of mu over each training instrument's notes, with its name, dataset id,
    family and class, plus the bounds of all training mu (latent units).

    Returns {"instruments": [{instrument_str, instrument, family, family_str, class, x, y, n_notes}],
    "bounds": {"x": [min, max], "y": [min, max], "radius": max ||mu||}}.
    """
    mu = latent_means(model, lat.emb) if mu is None else mu
    names = np.array(lat.instrument_str)
    rows = []
    for c in classes:
        sel = mu[names == c["instrument_str"]]
        x, y = sel.mean(axis=0) if len(sel) else (float("nan"), float("nan"))
        rows.append({**c, "family_str": FAMILIES[c["family"]], "x": float(x), "y": float(y), "n_notes": len(sel)})
    bounds = {"x": [float(mu[:, 0].min()), float(mu[:, 0].max())], "y": [float(mu[:, 1].min()), float(mu[:, 1].max())],
              "radius": float(np.linalg.norm(mu, axis=1).max())}
    return {"instruments": rows, "bounds": bounds}
