"""`pgesam-train transformer eval`: the Transformer columns of Tables 3 and 4, beside the paper, plus the pitch of
the decoded audio by torchcrepe on test instruments and on points between instruments.

Generation is free-running from <BOS> with the KV cache, conditioned on the frozen VAE's mu of each ground-truth
note (no noise) and its pitch. Table 3's figure is the MAE over every element of the raw (dim x frames) codec
embedding of each note, averaged over notes; the teacher-forced MAE (each frame predicted from the true previous
ones) is given beside it. Table 4 is the share of generated notes whose VAE pitch-classifier argmax is the
requested pitch. Our codec is not the paper's EnCodec, so MAE magnitudes compare only loosely: `gt_mean_abs`
(mean |ground truth - its channel mean|) gives the scale.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .codec import Codec
from .data.latents import Latents, load_latents
from .generate import generate_cached
from .pitch import estimate_pitch
from .reports import write_json_markdown
from .train_transformer import vae_posterior
from .transformer import TimbreTransformer
from .vae import VAE

log = logging.getLogger(__name__)
PAPER = {"mae": {"train": 4.90e-5, "test": 1.49e-3}, "mae_vae": {"train": 1.14e-3, "test": 1.02e-3},
         "pitch_acc": {"train": 1.00, "test": 0.996}, "pitch_acc_gt": {"train": 1.00, "test": 0.755},
         "pitch_acc_vae": {"train": 0.112, "test": 6.91e-2}}


def pick(n_total: int, n_max: int | None, seed: int) -> np.ndarray:
    """A deterministic, sorted subset of at most n_max row indices (all rows when n_max is None)."""
    if n_max is None or n_max >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n_max, replace=False))


def generate_notes(model: TimbreTransformer, z: torch.Tensor, pitch: torch.Tensor, batch_size: int = 64
                   ) -> torch.Tensor:
    """Free-running KV-cached generation in batches: z (N, 2), pitch (N,) MIDI -> (N, dim, frames) on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    parts = [generate_cached(model, z[s:s + batch_size].to(device), pitch[s:s + batch_size].to(device)).cpu()
             for s in range(0, len(pitch), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, model.config.dim, model.config.frames)


@torch.no_grad()
def teacher_forced(model: TimbreTransformer, z: torch.Tensor, pitch: torch.Tensor, emb: torch.Tensor,
                   batch_size: int = 64) -> torch.Tensor:
    """Predictions of every frame from the true previous frames: emb (N, dim, T) -> (N, dim, T)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for s in range(0, len(pitch), batch_size):
        frames = emb[s:s + batch_size].transpose(1, 2).to(device)  # (B, T, dim)
        inp = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], dim=1)
        out.append(model(z[s:s + batch_size].to(device), pitch[s:s + batch_size].to(device), inp).cpu())
    return torch.cat(out).transpose(1, 2)


@torch.no_grad()
def vae_pitch_accuracy(vae: VAE, emb: torch.Tensor, pitch: torch.Tensor, batch_size: int = 256) -> float:
    """Share of notes (N, dim, frames) whose VAE pitch-classifier argmax is their MIDI pitch (N,)."""
    vae.eval()
    hits = [(vae.encode(emb[s:s + batch_size])[2].argmax(1) == pitch[s:s + batch_size] - vae.config.pitch_min)
            for s in range(0, len(pitch), batch_size)]
    return float(torch.cat(hits).float().mean()) if hits else float("nan")


def split_metrics(model: TimbreTransformer, vae: VAE, lat: Latents, idx: np.ndarray, batch_size: int
                  ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Tables 3-4 on rows idx of one split -> (metrics, generated (n, dim, T), MIDI pitch (n,))."""
    emb = torch.from_numpy(np.asarray(lat.emb[idx], dtype=np.float32))  # (n, dim, T)
    pitch = torch.from_numpy(lat.pitch[idx].astype(np.int64))
    mu, _ = vae_posterior(vae, lat.emb[idx])
    gen = generate_notes(model, mu, pitch, batch_size)
    tf = teacher_forced(model, mu, pitch, emb, batch_size)
    metrics = {"n": len(idx), "mae": float((gen - emb).abs().mean()), "mse": float(((gen - emb) ** 2).mean()),
               "mae_teacher_forced": float((tf - emb).abs().mean()),
               "gt_mean_abs": float((emb - emb.mean(dim=(0, 2), keepdim=True)).abs().mean()),
               "pitch_acc": vae_pitch_accuracy(vae, gen, pitch), "pitch_acc_gt": vae_pitch_accuracy(vae, emb, pitch)}
    return metrics, gen, pitch


@torch.no_grad()
def audio_pitch(codec: Codec, emb: torch.Tensor, pitch: torch.Tensor, batch_size: int = 8) -> dict:
    """Decode notes (N, dim, T) and judge their pitch with torchcrepe: share within 50 cents of pitch (N,)."""
    cents, voiced = [], []
    for s in range(0, len(pitch), batch_size):
        wavs = codec.decode(emb[s:s + batch_size]).cpu().numpy()  # (B, T * hop)
        for wav, p in zip(wavs, pitch[s:s + batch_size].tolist()):
            est = estimate_pitch(wav, codec.sample_rate)
            cents.append(est.cents_off(p))
            voiced.append(est.voiced)
    c = np.abs(np.array(cents, dtype=float))
    within = np.nan_to_num(c, nan=np.inf) <= 50.0
    return {"n": len(c), "within_50c": float(within.mean()) if len(c) else float("nan"),
            "median_abs_cents": float(np.nanmedian(c)) if np.isfinite(c).any() else float("nan"),
            "voiced": float(np.mean(voiced)) if voiced else float("nan"),
            "per_note": {"pitch": [int(p) for p in pitch.tolist()],
                         "cents": [None if not np.isfinite(x) else float(x) for x in cents]}}


def centroids(mu: torch.Tensor, names: list[str]) -> tuple[list[str], torch.Tensor]:
    """The mean of mu (N, 2) over each instrument's notes -> (names, (K, 2))."""
    keys = sorted(set(names))
    arr = np.array(names)
    return keys, torch.stack([mu[torch.from_numpy(arr == k)].mean(0) for k in keys])


def interpolated_points(points: torch.Tensor, n: int, pitch_min: int, n_pitches: int, seed: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """n points between random pairs of distinct instrument centroids (K, 2), at t in {1/4, 1/2, 3/4}, with random
    pitches -> z (n, 2), pitch (n,) MIDI."""
    if len(points) < 2:
        raise ValueError("interpolation needs at least two instruments")
    rng = np.random.default_rng(seed)
    pairs = np.array([rng.choice(len(points), 2, replace=False) for _ in range(n)]).reshape(n, 2)
    t = torch.tensor(np.resize([0.25, 0.5, 0.75], n), dtype=torch.float32)[:, None]
    z = points[pairs[:, 0]] * (1 - t) + points[pairs[:, 1]] * t
    return z, torch.from_numpy(rng.integers(pitch_min, pitch_min + n_pitches, n).astype(np.int64))


def evaluate_transformer(model: TimbreTransformer, vae: VAE, cache_dir: Path, codec: Codec | None = None,
                         max_notes: int | None = 500, audio_notes: int = 100, interp_notes: int = 100,
                         batch_size: int = 64, seed: int = 0, echo: Callable[[str], None] = log.info) -> dict:
    """Tables 3-4 on train and test; with a codec, torchcrepe on train and test notes (ground truth through the
    codec, and generated) and on interpolated points between training and between test instruments."""
    out: dict = {"generation": "free-running from <BOS>, KV cache, z = VAE mu of the ground-truth note",
                 "mae": "mean |generated - ground truth| over all dim x frames elements, averaged over notes"}
    lat = {split: load_latents(cache_dir, split) for split in ("train", "test")}
    for split in ("train", "test"):
        idx = pick(len(lat[split]), max_notes, seed)
        out[split], gen, pitch = split_metrics(model, vae, lat[split], idx, batch_size)
        echo(f"{split}: {json.dumps(out[split])}")
        if codec is not None:
            a = pick(len(idx), audio_notes, seed)
            gt = torch.from_numpy(np.asarray(lat[split].emb[idx[a]], dtype=np.float32))
            out.setdefault("audio", {}).update({f"{split}_ground_truth": audio_pitch(codec, gt, pitch[a]),
                                                f"{split}_generated": audio_pitch(codec, gen[a], pitch[a])})
    if codec is not None:
        cfg = model.config
        for split in ("train", "test"):
            mu, _ = vae_posterior(vae, lat[split].emb)
            _, points = centroids(mu, lat[split].instrument_str)
            z, pitch = interpolated_points(points, interp_notes, cfg.pitch_min, cfg.n_pitches, seed)
            out["audio"][f"interpolated_{split}"] = audio_pitch(codec, generate_notes(model, z, pitch, batch_size),
                                                                pitch)
        echo("audio: " + json.dumps({k: {m: v for m, v in r.items() if m != "per_note"}
                                     for k, r in out["audio"].items()}))
    return out


def _g(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3g}"


def report_markdown(m: dict) -> str:
    """Tables 3 and 4 beside the paper, and the torchcrepe figures."""
    rows = [f"Generation: {m['generation']}. MAE: {m['mae']}.", "",
            "Table 3: MAE of reconstruction (Transformer)", "",
            "| split | notes | ours free-running | ours teacher-forced | ours MSE | GT scale | paper |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in ("train", "test"):
        r = m[s]
        rows.append(f"| {s} | {r['n']} | {_g(r['mae'])} | {_g(r['mae_teacher_forced'])} | {_g(r['mse'])} | "
                    f"{_g(r['gt_mean_abs'])} | {_g(PAPER['mae'][s])} |")
    rows += ["", "Table 4: pitch accuracy by the VAE's pitch classifier", "",
             "| split | ours GT | ours Transformer | paper GT | paper Transformer |", "|---|---:|---:|---:|---:|"]
    for s in ("train", "test"):
        r = m[s]
        rows.append(f"| {s} | {_g(r['pitch_acc_gt'])} | {_g(r['pitch_acc'])} | {_g(PAPER['pitch_acc_gt'][s])} | "
                    f"{_g(PAPER['pitch_acc'][s])} |")
    if "audio" in m:
        rows += ["", "Decoded audio judged by torchcrepe (not in the paper)", "",
                 "| notes | n | within 50 cents | median abs cents | voiced |", "|---|---:|---:|---:|---:|"]
        for name, r in m["audio"].items():
            rows.append(f"| {name.replace('_', ' ')} | {r['n']} | {_g(r['within_50c'])} | "
                        f"{_g(r['median_abs_cents'])} | {_g(r['voiced'])} |")
    return "\n".join(rows)


def write_report(out_dir: Path, metrics: dict) -> tuple[Path, Path]:
    """transformer_eval.json and transformer_eval.md in out_dir."""
    return write_json_markdown(out_dir, "transformer_eval", metrics, report_markdown(metrics))
