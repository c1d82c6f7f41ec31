"""Codec training: random crops of the dataset's train split, multi-scale spectral losses, AdamW, resumable.

    pgesam-train codec train --backend stft --preset small --dataset DIR [--steps N] [--minutes M] [--out CKPT]

Loss = loss_mel * multi-scale log-mel L1 + loss_stft * multi-resolution STFT (spectral convergence + log-magnitude
L1) + loss_wav * waveform L1, at FFT sizes 512 / 1024 / 2048. The last `codec.stream_latency` samples of a crop are
left out of the loss: with an overlap-add decoder they lack the frames after the crop.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .codec import KIND, Codec, CodecError, build_codec, codec_from_state, resample, save_codec
from .codecs.modules import mel_filterbank
from .config import CodecConfig, from_dict, to_dict
from .data.nsynth import Note, load_audio, load_split
from .training import CSVLog, seed_everything, set_threads

DATASET_SR = 16000
SCALES = (512, 1024, 2048)  # FFT sizes of the spectral losses; hop = n_fft / 4, n_mels = n_fft / 8


def _log(x: Tensor) -> Tensor:
    return torch.log(torch.clamp(x, min=1e-5))


class SpectralLoss(nn.Module):
    """Multi-scale log-mel L1 and multi-resolution STFT distance between y and x, both (B, S)."""

    def __init__(self, sample_rate: int, scales: tuple[int, ...] = SCALES):
        super().__init__()
        self.scales = scales
        for n in scales:
            self.register_buffer(f"mel{n}", mel_filterbank(sample_rate, n, n // 8), persistent=False)
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def _mag(self, x: Tensor, n: int) -> Tensor:
        spec = torch.stft(x, n, n // 4, window=getattr(self, f"win{n}"), return_complex=True)
        return torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-10)  # (B, F, frames)

    def forward(self, y: Tensor, x: Tensor) -> dict[str, Tensor]:
        mel = stft = y.new_zeros(())
        for n in self.scales:
            Y, X = self._mag(y, n), self._mag(x, n)
            fb = getattr(self, f"mel{n}")  # (n_mels, F)
            mel = mel + (_log(fb @ Y) - _log(fb @ X)).abs().mean()
            convergence = torch.linalg.norm(Y - X) / (torch.linalg.norm(X) + 1e-7)
            stft = stft + convergence + (_log(Y) - _log(X)).abs().mean()
        k = len(self.scales)
        return {"mel": mel / k, "stft": stft / k, "wav": (y - x).abs().mean()}


class CropSampler:
    """Random crops (B, crop) of 24 kHz audio from NSynth-format notes; near-silent crops are redrawn.

    Notes are read and resampled on first use and kept as float16 up to `cache_mb` megabytes."""

    def __init__(self, notes: list[Note], sample_rate: int, crop: int, seed: int, cache_mb: int = 1024):
        if not notes:
            raise CodecError("no notes to train on: the dataset's split is empty")
        self.notes, self.sr, self.crop = notes, sample_rate, crop
        self.rng = np.random.default_rng(seed)
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes, self._cache_cap = 0, cache_mb << 20

    def audio(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        x = resample(load_audio(self.notes[i], DATASET_SR), DATASET_SR, self.sr).astype(np.float16)
        if self._cache_bytes + x.nbytes <= self._cache_cap:
            self._cache[i] = x
            self._cache_bytes += x.nbytes
        return x

    def one(self) -> np.ndarray:
        for _ in range(10):
            x = self.audio(int(self.rng.integers(len(self.notes))))
            if len(x) < self.crop:
                x = np.pad(x, (0, self.crop - len(x)))
            start = int(self.rng.integers(len(x) - self.crop + 1))
            seg = x[start:start + self.crop]
            if np.abs(seg).max() > 0.01:
                break
        return seg.astype(np.float32)

    def batch(self, batch_size: int) -> Tensor:
        return torch.from_numpy(np.stack([self.one() for _ in range(batch_size)]))  # (B, crop)


def learning_rate(config: CodecConfig, step: int) -> float:
    """Linear warm-up over the first 5 % of steps (at most 500), then cosine decay to 10 % of config.lr."""
    warmup = max(1, min(500, config.steps // 20))
    progress = min(1.0, step / max(1, config.steps))
    return config.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def reconstruction_loss(codec: Codec, loss_fn: SpectralLoss, x: Tensor) -> dict[str, Tensor]:
    """Weighted loss of decode(encode(x)) against x (B, S), the trailing `stream_latency` samples left out."""
    y = codec.decode(codec.encode(x))
    keep = x.shape[1] - codec.stream_latency
    terms = loss_fn(y[:, :keep], x[:, :keep])
    c = codec.config
    terms["loss"] = c.loss_mel * terms["mel"] + c.loss_stft * terms["stft"] + c.loss_wav * terms["wav"]
    return terms


def _start_or_resume(config: CodecConfig, out: Path) -> tuple[Codec, torch.optim.Optimizer, int, float]:
    """A fresh codec and optimizer, or both restored from `out` (which must hold the same config but steps);
    also the step and the training seconds so far."""
    state = load_checkpoint(out, KIND) if out.is_file() else None
    if state is not None:
        stored = dataclasses.replace(from_dict(CodecConfig, state["config"]), steps=config.steps)
        if to_dict(stored) != to_dict(config):
            diff = {k: v for k, v in to_dict(stored).items() if to_dict(config)[k] != v}
            raise CodecError(f"{out} was trained with another config ({diff}); resume with the same "
                             "--backend/--preset or choose another --out")
        codec = codec_from_state(state)
        codec.config = config
    else:
        codec = build_codec(config)
    params = [p for p in codec.parameters() if p.requires_grad]
    if not params:
        raise CodecError(f"the {config.backend} codec has nothing to train (the griffinlim floor needs no "
                         "training; `pgesam-train codec eval` always reports it)")
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.8, 0.99), weight_decay=0.01)
    if state is not None and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
    if state is None:
        return codec, opt, 0, 0.0
    return codec, opt, int(state["step"]), float(state["extra"].get("seconds", 0.0))


@torch.no_grad()
def validation_loss(codec: Codec, loss_fn: SpectralLoss, crops: Tensor, batch_size: int) -> float:
    codec.eval()
    losses = [reconstruction_loss(codec, loss_fn, crops[i:i + batch_size])["loss"].item()
              for i in range(0, len(crops), batch_size)]
    codec.train()
    return float(np.mean(losses))


def _valid_crops(dataset_dir: Path, config: CodecConfig, crop: int, n: int = 16) -> Tensor | None:
    try:
        notes = load_split(dataset_dir, "valid")
    except ValueError:
        return None
    return CropSampler(notes, config.sample_rate, crop, seed=12345).batch(n) if notes else None


def _train_step(codec: Codec, opt: torch.optim.Optimizer, loss_fn: SpectralLoss, batch: Tensor,
                lr: float) -> dict[str, float]:
    for group in opt.param_groups:
        group["lr"] = lr
    terms = reconstruction_loss(codec, loss_fn, batch)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
    opt.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def train_codec(config: CodecConfig, dataset_dir: Path, out: Path, minutes: float | None = None,
                save_every: int = 500, log_every: int = 10, threads: int | None = None,
                progress: bool = True) -> dict:
    """Train (or resume) a codec until config.steps or `minutes` of wall time (or Ctrl-C); checkpoint to `out`
    every `save_every` steps and at the end, log losses to `out`.csv (seconds counted across resumes).
    Returns {"step", "seconds" (this run), "steps_per_s", "loss", "valid_loss", "checkpoint"}."""
    set_threads(threads)
    out = Path(out)
    codec, opt, step, seconds_before = _start_or_resume(config, out)
    seed_everything(config.seed + step)
    crop = config.crop_frames * config.hop
    sampler = CropSampler(load_split(dataset_dir, "train"), config.sample_rate, crop, seed=config.seed + step)
    valid = _valid_crops(dataset_dir, config, crop)
    loss_fn, log = SpectralLoss(config.sample_rate), CSVLog(out.with_suffix(".csv"))
    codec.train()
    t0, start_step, last, valid_loss = time.monotonic(), step, {}, float("nan")

    def elapsed() -> float:
        return seconds_before + time.monotonic() - t0

    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"codec {config.backend}", unit="step")
    try:
        while step < config.steps and (minutes is None or time.monotonic() - t0 < 60 * minutes):
            last = _train_step(codec, opt, loss_fn, sampler.batch(config.batch_size), learning_rate(config, step))
            step += 1
            checkpoint_now = step % save_every == 0 or step == config.steps
            if checkpoint_now:
                valid_loss = float("nan") if valid is None else validation_loss(codec, loss_fn, valid,
                                                                                config.batch_size)
                save_codec(out, codec, opt, step, extra={"valid_loss": valid_loss, "seconds": elapsed()})
            if step % log_every == 0 or checkpoint_now:
                log.write(step=step, seconds=round(elapsed(), 2), lr=opt.param_groups[0]["lr"],
                          **{k: round(v, 5) for k, v in last.items()}, valid_loss=valid_loss if checkpoint_now else "")
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", mel=f"{last['mel']:.3f}")
    except KeyboardInterrupt:
        bar.write(f"interrupted at step {step}: checkpointing to {out}; run the same command again to resume")
    bar.close()
    save_codec(out, codec, opt, step, extra={"valid_loss": valid_loss, "seconds": elapsed()})
    seconds = time.monotonic() - t0
    return {"step": step, "seconds": seconds, "steps_per_s": (step - start_step) / max(seconds, 1e-9),
            "loss": last.get("loss", float("nan")), "valid_loss": valid_loss, "checkpoint": str(out)}
