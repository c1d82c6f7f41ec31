"""`pgesam-train`: data, training, evaluation and export commands (torch side).

Subcommand groups live in their own modules (cli_codec, cli_vae, cli_transformer, ...); heavy imports happen inside
commands so `pgesam-train --help` stays fast.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import DATA_PRESET_TABLE, SPLITS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train and evaluate pGESAM models and export them for the realtime engine."""


@main.group()
def dataset() -> None:
    """Build, check and encode NSynth-format datasets."""


@dataset.command("build")
@click.option("--preset", type=click.Choice(list(DATA_PRESET_TABLE)), default="default", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: $PGESAM_HOME/datasets/soundfonts-PRESET).")
@click.option("--soundfont", "soundfonts", multiple=True, help="Only these soundfonts (repeatable).")
@click.option("--family", "families", multiple=True, help="Only these NSynth families (repeatable).")
@click.option("--pitch-min", type=int, default=None)
@click.option("--pitch-max", type=int, default=None)
@click.option("--velocity", type=int, default=None)
@click.option("--workers", type=int, default=None, help="Parallel FluidSynth workers.")
@click.option("--force", is_flag=True, help="Replace an existing dataset at --out.")
def dataset_build(preset: str, out: Path | None, soundfonts: tuple[str, ...], families: tuple[str, ...],
                  pitch_min: int | None, pitch_max: int | None, velocity: int | None, workers: int | None,
                  force: bool) -> None:
    """Render an NSynth-format dataset from General-MIDI soundfonts."""
    import dataclasses

    from . import paths
    from .config import data_preset
    from .data.build import build_dataset
    overrides = {k: v for k, v in dict(soundfonts=soundfonts or None, families=families or None, pitch_min=pitch_min,
                                       pitch_max=pitch_max, velocity=velocity, workers=workers).items()
                 if v is not None}
    cfg = dataclasses.replace(data_preset(preset), **overrides)
    out = out or paths.dataset_dir(preset)
    meta = build_dataset(cfg, out, preset_name=preset, force=force, log=click.echo)
    click.echo(f"\n{meta['summary']}\n")
    if meta["excluded_instruments"]:
        click.echo(f"excluded instruments: {len(meta['excluded_instruments'])} "
                   f"({_count(meta['excluded_instruments'], 'verdict')}); details in dataset.json")
    click.echo(f"dropped notes: {meta['dropped_notes'] or 'none'}")
    click.echo(f"time: {meta['seconds']} s -> {out}")


def _count(rows: list[dict], key: str) -> str:
    from collections import Counter
    return ", ".join(f"{k} {n}" for k, n in sorted(Counter(r[key] for r in rows).items()))


@dataset.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--split", "splits", multiple=True, type=click.Choice(SPLITS), help="Only these splits.")
@click.option("--sample-rate", type=int, default=16000, show_default=True)
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds per note.")
def dataset_check(root: Path, splits: tuple[str, ...], sample_rate: int, duration: float) -> None:
    """Validate an NSynth-format folder (ours or the real NSynth)."""
    from .data.nsynth import check_dataset
    counts, problems = check_dataset(root, sample_rate, duration, splits or SPLITS)
    for split, n in counts.items():
        click.echo(f"nsynth-{split}: {n} notes")
    for p in problems[:50]:
        click.echo(f"error: {p}", err=True)
    if problems:
        more = f" (first 50 shown)" if len(problems) > 50 else ""
        raise click.ClickException(f"{len(problems)} problems in {root}{more}")
    click.echo("ok")


from .cli_codec import codec_group, dataset_encode_cmd  # noqa: E402  (no torch at import)
from .cli_transformer import bench_command, render_command, transformer  # noqa: E402
from .cli_vae import vae  # noqa: E402

dataset.add_command(dataset_encode_cmd, "encode")
main.add_command(codec_group)
main.add_command(vae)
main.add_command(transformer)
main.add_command(render_command)
main.add_command(bench_command)
from .cli_export import export_command  # noqa: E402
main.add_command(export_command)


def run() -> None:
    """Entry point with one-line errors for the failures a user can act on."""
    try:
        main(standalone_mode=True)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
