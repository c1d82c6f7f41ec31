"""`pgesam-train transformer {train,eval}`, `pgesam-train render` and `pgesam-train bench` (registered by cli.py).

Every command takes `--preset tiny|small|paper`: it picks the config (train, bench) and the default checkpoint
folder $PGESAM_HOME/checkpoints/transformer/PRESET. The VAE defaults to the same preset's VAE checkpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from .config import MODEL_PRESETS

PRESET = click.option("--preset", type=click.Choice(MODEL_PRESETS), default="small", show_default=True)
LATENTS = click.option("--latents", type=click.Path(path_type=Path), default=None,
                       help="Latent cache folder (default: newest cache of the default dataset).")
CHECKPOINT = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                          help="Transformer checkpoint (default: $PGESAM_HOME/checkpoints/transformer/PRESET/"
                               "transformer.pt).")
VAE = click.option("--vae", "vae_path", type=click.Path(path_type=Path), default=None,
                   help="Frozen VAE checkpoint (default: the one the Transformer was trained with, else "
                        "$PGESAM_HOME/checkpoints/vae/PRESET/vae.pt).")
CODEC = click.option("--codec", "codec_path", type=click.Path(path_type=Path), default=None,
                     help="Codec checkpoint (default: the codec that encoded the Transformer's latents).")
THREADS = click.option("--threads", type=int, default=None, help="Torch intra-op threads (1 is steadiest).")
DEVICE = click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1, ...")


def default_checkpoint(preset: str, explicit: Path | None) -> Path:
    from . import paths
    from .train_transformer import CHECKPOINT_NAME
    return explicit or paths.checkpoints_dir("transformer", preset) / CHECKPOINT_NAME


def _vae_path(preset: str, explicit: Path | None, extra: dict | None = None) -> Path:
    from .cli_vae import default_checkpoint as vae_checkpoint
    if explicit is None and extra and extra.get("vae") and Path(extra["vae"]).is_file():
        return Path(extra["vae"])
    return vae_checkpoint(preset, explicit)


@click.group("transformer")
def transformer() -> None:
    """Stage 2: the pitch/timbre-conditioned Transformer (Section 3.2 of the paper)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@transformer.command("train")
@PRESET
@LATENTS
@VAE
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (default: $PGESAM_HOME/checkpoints/transformer/PRESET).")
@click.option("--steps", type=int, default=None, help="Override the preset's number of optimiser steps.")
@click.option("--resume", is_flag=True, help="Continue transformer.pt in --out (up to --steps).")
@click.option("--input-noise", type=float, default=None,
              help="Override the preset's std of the noise on teacher-forced decoder inputs (embedding-std units).")
@click.option("--low-dims", type=int, default=None,
              help="Weigh the first N embedding dims (the lowest mel bands) by --low-dims-weight in the loss.")
@click.option("--low-dims-weight", type=float, default=None, help="Loss weight of the first --low-dims dims.")
@click.option("--lr", type=float, default=None,
              help="Override the preset's peak learning rate (the cosine schedule's top).")
@click.option("--min-lr-ratio", type=float, default=None,
              help="Override where the cosine ends, as a fraction of --lr (1 = constant after warm-up). With "
                   "--resume, `--lr L --min-lr-ratio 1` continues at L instead of the schedule's rate.")
@click.option("--stop-after", type=int, default=None,
              help="End this session (checkpointed) after this step; continue later with --resume.")
@THREADS
@DEVICE
def train_cmd(preset: str, latents: Path | None, vae_path: Path | None, out: Path | None, steps: int | None,
              resume: bool, input_noise: float | None, low_dims: int | None, low_dims_weight: float | None,
              lr: float | None, min_lr_ratio: float | None, stop_after: int | None, threads: int | None,
              device: str) -> None:
    """Train with teacher-forced next-frame MSE on z~ = mu + sigma * eps * 0.01 of the frozen VAE."""
    import dataclasses

    from . import paths
    from .cli_vae import find_latents
    from .config import transformer_preset
    from .train_transformer import train_transformer
    cfg = transformer_preset(preset)
    cfg = dataclasses.replace(cfg, steps=steps) if steps else cfg
    given = {k: v for k, v in {"input_noise": input_noise, "low_dims": low_dims, "low_dims_weight": low_dims_weight,
                               "lr": lr, "min_lr_ratio": min_lr_ratio}.items() if v is not None}
    try:  # the config refuses bad values: before anything loads
        cfg = dataclasses.replace(cfg, **given)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=" / ".join(f"--{k.replace('_', '-')}" for k in given)) from e
    out = out or paths.checkpoints_dir("transformer", preset)
    ckpt = train_transformer(cfg, find_latents(latents), _vae_path(preset, vae_path), out, resume, threads, device,
                             stop_after)
    click.echo(f"checkpoint: {ckpt}")


@transformer.command("eval")
@PRESET
@LATENTS
@CHECKPOINT
@VAE
@CODEC
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: $PGESAM_HOME/runs/transformer-eval-PRESET).")
@click.option("--max-notes", type=int, default=500, show_default=True, help="Notes per split for Tables 3-4.")
@click.option("--audio-notes", type=int, default=100, show_default=True,
              help="Test notes judged by torchcrepe (ground truth and generated).")
@click.option("--interp-notes", type=int, default=100, show_default=True,
              help="Interpolated points judged by torchcrepe, between train and between test instruments each.")
@click.option("--audio/--no-audio", default=True, show_default=True, help="Decode and run torchcrepe.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@THREADS
@DEVICE
def eval_cmd(preset: str, latents: Path | None, checkpoint: Path | None, vae_path: Path | None,
             codec_path: Path | None, out: Path | None, max_notes: int, audio_notes: int, interp_notes: int,
             audio: bool, batch_size: int, threads: int | None, device: str) -> None:
    """Tables 3 and 4 (Transformer columns) beside the paper, plus audio pitch accuracy by torchcrepe."""
    from . import paths
    from .cli_vae import find_latents
    from .evaluate_transformer import evaluate_transformer, report_markdown, write_report
    from .render import find_codec
    from .training import set_threads
    from .transformer import load_transformer
    from .vae import load_vae
    set_threads(threads)
    model, extra = load_transformer(default_checkpoint(preset, checkpoint))
    vae, _ = load_vae(_vae_path(preset, vae_path, extra))
    cache = find_latents(latents) if latents or not extra.get("latents") else Path(extra["latents"])
    codec = find_codec(extra.get("codec"), codec_path) if audio else None
    metrics = evaluate_transformer(model.to(device), vae, cache, codec, max_notes, audio_notes, interp_notes,
                                   batch_size, echo=click.echo)
    metrics["command"] = (f"pgesam-train transformer eval --preset {preset} --max-notes {max_notes} --audio-notes "
                          f"{audio_notes} --interp-notes {interp_notes}" + ("" if audio else " --no-audio")
                          + "".join(f" {flag} {path}" for flag, path in (("--checkpoint", checkpoint),
                                                                         ("--vae", vae_path)) if path))
    js, md = write_report(out or paths.runs_dir(f"transformer-eval-{preset}"), metrics)
    click.echo(report_markdown(metrics))
    click.echo(f"written to {js} and {md}")


@click.command("render")
@PRESET
@CHECKPOINT
@CODEC
@click.option("--x", type=float, required=True, help="Timbre point x (latent units; the map is the unit disc).")
@click.option("--y", type=float, required=True, help="Timbre point y.")
@click.option("--pitch", type=int, default=60, show_default=True, help="MIDI pitch (ignored with --grid).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="WAV file; with --grid a folder for pitch_NNN.wav and grid.png.")
@click.option("--grid", is_flag=True, help="Render every pitch of the model and a PNG of their spectrograms.")
@THREADS
def render_command(preset: str, checkpoint: Path | None, codec_path: Path | None, x: float, y: float, pitch: int,
                   out: Path, grid: bool, threads: int | None) -> None:
    """Render a note (or, with --grid, all pitches) at a timbre point with the torch models."""
    from .render import find_codec, render_grid, render_notes, write_wav
    from .training import set_threads
    from .transformer import load_transformer
    set_threads(threads)
    model, extra = load_transformer(default_checkpoint(preset, checkpoint))
    codec = find_codec(extra.get("codec"), codec_path)
    if grid:
        for path in render_grid(model, codec, x, y, out):
            click.echo(f"wrote {path}")
        return
    audio = render_notes(model, codec, x, y, [pitch])[0]
    click.echo(f"wrote {write_wav(out, audio, codec.sample_rate)}")


@click.command("bench")
@PRESET
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Time a trained Transformer (default: random weights of the preset).")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 25), show_default=True)
@click.option("--method", "methods", multiple=True, default=("torch-uncached", "torch-cached", "torch-cached-dynamic"),
              show_default=True,
              help="Methods to time (see pgesam_train.bench.METHODS).")
@click.option("--onnx", "onnx", is_flag=True, help="Also time the note through ONNX Runtime (method onnx-cached).")
@click.option("--onnx-bundle", type=click.Path(path_type=Path), default=None,
              help="With --onnx: time this exported bundle (default: the timed model, exported on the fly).")
@click.option("--frames", type=int, default=300, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Cached runs: best of this many.")
@click.option("--uncached-stride", type=int, default=10, show_default=True,
              help="Batches > 1: time every Nth uncached forward and interpolate (1: time it all).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: $PGESAM_HOME/runs/bench-PRESET).")
@THREADS
def bench_command(preset: str, checkpoint: Path | None, batches: tuple[int, ...], methods: tuple[str, ...],
                  onnx: bool, onnx_bundle: Path | None, frames: int, repeats: int, uncached_stride: int, out: Path | None, threads: int | None) -> None:
    """Seconds to generate one 300-frame note: uncached (full forward per frame) vs KV-cached, and the ratio."""
    import torch

    from . import paths
    from .bench import BenchSetup, markdown, run_bench, write_report
    from .config import transformer_preset
    from .training import set_threads
    from .transformer import TimbreTransformer, load_transformer
    set_threads(threads)
    if checkpoint is None:
        torch.manual_seed(0)
    model = load_transformer(checkpoint)[0] if checkpoint else TimbreTransformer(transformer_preset(preset))
    setup = BenchSetup(model, frames=frames, repeats=repeats, uncached_stride=uncached_stride, onnx_bundle=onnx_bundle)
    methods = tuple(methods) + (("onnx-cached",) if onnx and "onnx-cached" not in methods else ())
    report = run_bench(setup, list(methods), list(batches), log=click.echo)
    report["weights"] = str(checkpoint) if checkpoint else f"random ({preset} preset)"
    js, md = write_report(report, out or paths.runs_dir(f"bench-{preset}"))
    click.echo(markdown(report))
    click.echo(f"written to {js} and {md}")
