"""`pgesam-train vae ...`: train, evaluate, ablate and map the stage-1 timbre VAE.

Every command takes `--preset tiny|small|paper` (the default checkpoint and run folders depend on it) and
`--latents DIR` (default: the newest latent cache of the default dataset under $PGESAM_HOME/latents).
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
                          help="VAE checkpoint (default: $PGESAM_HOME/checkpoints/vae/PRESET/vae.pt).")
THREADS = click.option("--threads", type=int, default=None, help="Torch intra-op threads (1 is steadiest).")
EPOCHS = click.option("--epochs", type=int, default=None, help="Override the preset's number of epochs.")
BATCH = click.option("--batch-size", type=click.IntRange(min=2), default=None,
                     help="Override the preset's minibatch size (the neighbour loss pairs notes within one).")


def find_latents(explicit: Path | None) -> Path:
    """The latent cache to use: `explicit`, else the newest `soundfonts-default--*` cache, else the only cache."""
    from . import paths
    if explicit is not None:
        return explicit
    root = paths.home() / "latents"
    caches = sorted((p.parent for p in root.glob("*/meta.json")), key=lambda p: p.stat().st_mtime, reverse=True)
    default = [p for p in caches if p.name.startswith(f"{paths.dataset_dir('default').name}--")]
    if default:
        return default[0]
    if len(caches) == 1:
        return caches[0]
    if not caches:
        raise click.ClickException(f"no latent cache under {root}: run `pgesam-train dataset encode` first, "
                                   "or pass --latents DIR")
    raise click.ClickException(f"several latent caches under {root} ({', '.join(p.name for p in caches)}); "
                               "choose one with --latents DIR")


def default_checkpoint(preset: str, explicit: Path | None) -> Path:
    from . import paths
    from .train_vae import CHECKPOINT_NAME
    return explicit or paths.checkpoints_dir("vae", preset) / CHECKPOINT_NAME


def _config(preset: str, epochs: int | None, batch_size: int | None = None):
    import dataclasses

    from .config import vae_preset
    cfg = vae_preset(preset)
    cfg = dataclasses.replace(cfg, epochs=epochs) if epochs else cfg
    return dataclasses.replace(cfg, batch_size=batch_size) if batch_size else cfg


@click.group()
def vae() -> None:
    """Stage 1: the 2-D timbre VAE (Section 3.1 of the paper)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@vae.command("train")
@PRESET
@LATENTS
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (default: $PGESAM_HOME/checkpoints/vae/PRESET).")
@EPOCHS
@BATCH
@THREADS
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out (epochs and schedule continue).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_cmd(preset: str, latents: Path | None, out: Path | None, epochs: int | None, batch_size: int | None,
              threads: int | None, resume: bool, progress: bool) -> None:
    """Train the VAE (seven-part loss, Eq. 1); writes vae.pt, vae_map.json and loss CSVs."""
    from . import paths
    from .train_vae import train_vae
    out = out or paths.checkpoints_dir("vae", preset)
    ckpt = train_vae(_config(preset, epochs, batch_size), find_latents(latents), out, resume, threads, progress)
    click.echo(f"checkpoint: {ckpt}")


@vae.command("eval")
@PRESET
@LATENTS
@CHECKPOINT
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: $PGESAM_HOME/runs/vae-eval-PRESET).")
@THREADS
def eval_cmd(preset: str, latents: Path | None, checkpoint: Path | None, out: Path | None,
             threads: int | None) -> None:
    """Tables 3-5 (MAE, pitch accuracy, V_inst / V_pitch) beside the paper, and timbre maps of train and test."""
    from . import paths
    from .evaluate_vae import evaluate_checkpoint, report_markdown
    from .training import set_threads
    set_threads(threads)
    out = out or paths.runs_dir(f"vae-eval-{preset}")
    metrics = evaluate_checkpoint(default_checkpoint(preset, checkpoint), find_latents(latents), out)
    click.echo(report_markdown(metrics))
    click.echo(f"written to {out}")


@vae.command("ablate")
@PRESET
@LATENTS
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: $PGESAM_HOME/runs/vae-ablate-PRESET).")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Baseline checkpoint, trained with the same config as the ablations (default: the trained "
                   "PRESET checkpoint if it was; otherwise one is trained here).")
@EPOCHS
@BATCH
@THREADS
@click.option("--progress/--no-progress", default=True, show_default=True)
def ablate_cmd(preset: str, latents: Path | None, out: Path | None, baseline: Path | None, epochs: int | None,
               batch_size: int | None, threads: int | None, progress: bool) -> None:
    """Train the four ablations of Table 6 (no KL, no reg, no neighbour, no family classifier); write Table 6
    beside the paper and a Figure-4-style 2x2 plot. Rerunning continues unfinished runs."""
    from . import paths
    from .evaluate_vae import ablation_markdown, config_differences, run_ablations
    out = out or paths.runs_dir(f"vae-ablate-{preset}")
    cfg = _config(preset, epochs, batch_size)
    if baseline is None:  # the trained preset checkpoint, if it was trained as these ablations will be
        baseline = default_checkpoint(preset, None)
        differ = config_differences(baseline, cfg) if baseline.is_file() else []
        if differ:
            click.echo(f"{baseline} was trained with another config ({', '.join(differ)}); training the baseline "
                       f"in {out / 'baseline'}")
            baseline = None
    try:
        rows = run_ablations(cfg, find_latents(latents), out, baseline, threads, progress)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--baseline") from e
    click.echo(ablation_markdown(rows))
    click.echo(f"written to {out}")


@vae.command("map")
@PRESET
@LATENTS
@CHECKPOINT
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Figure folder (default: $PGESAM_HOME/runs/vae-map-PRESET).")
def map_cmd(preset: str, latents: Path | None, checkpoint: Path | None, out: Path | None) -> None:
    """Timbre map PNGs (Figure 3 style) of train and test, and the training instruments' centroids as JSON."""
    from . import paths
    from .evaluate_vae import write_maps
    out = out or paths.runs_dir(f"vae-map-{preset}")
    for path in write_maps(default_checkpoint(preset, checkpoint), find_latents(latents), out):
        click.echo(f"wrote {path}")
