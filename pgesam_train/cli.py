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


@main.command("pipeline")
@click.option("--preset", type=click.Choice(["tiny", "small", "paper"]), default="small", show_default=True)
@click.option("--stage", "stages", multiple=True, type=click.Choice(
    ["dataset", "codec", "encode", "vae", "transformer", "export"]), help="Only these stages (repeatable; in order).")
@click.option("--codec-steps", type=int, default=None, help="Override the codec preset's training steps.")
@click.option("--vae-epochs", type=int, default=None, help="Override the VAE preset's epochs.")
@click.option("--transformer-steps", type=int, default=None, help="Override the Transformer preset's steps.")
@click.option("--weights", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="The bundle's weight storage (fp16: half the size, float32 arithmetic).")
@click.option("--static/--no-static", default=False, show_default=True,
              help="Also export decoder_step_static (for CUDA graphs).")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
def pipeline_command(preset: str, stages: tuple[str, ...], codec_steps: int | None, vae_epochs: int | None,
                     transformer_steps: int | None, weights: str, static: bool, threads: int | None) -> None:
    """Soundfonts -> dataset -> codec -> latents -> VAE -> Transformer -> bundle; resumable, timed per stage."""
    import logging

    from .pipeline import STAGES, PipelinePlan, run_pipeline
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = PipelinePlan(preset, codec_steps, vae_epochs, transformer_steps, threads, weights, static)
    run_pipeline(plan, stages or STAGES, echo=click.echo)


@main.command("bundle-pitch")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Also a quantised variant of the bundle (int8, fp16).")
@click.option("--instruments", type=click.IntRange(1), default=4, show_default=True,
              help="Training instruments whose map points are rendered (every pitch at each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which instruments.")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True, help="Only every N-th pitch.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result as JSON here.")
def bundle_pitch_command(bundle: Path, variants: tuple[str, ...], instruments: int, seed: int, every: int,
                         threads: int | None, json_out: Path | None) -> None:
    """Pitch accuracy (torchcrepe) of the notes BUNDLE renders in the engine, and of its quantised variants."""
    import json

    from .eval_bundle import bundle_pitch, markdown
    try:
        result = bundle_pitch(bundle, (None, *variants), instruments, seed, threads, every, echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(markdown(result))
    if json_out is not None:
        from .reports import write_text_atomically
        write_text_atomically(json_out, json.dumps(result, indent=1))


@main.command("report")
@click.option("--preset", type=click.Choice(["small", "tiny", "paper"]), default="small", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("REPORT.md"), show_default=True)
@click.option("--docs", type=click.Path(path_type=Path), default=Path("docs"), show_default=True,
              help="folder for figures/ and audio/ (links in the report are relative to it)")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Markdown appended as 'Where we fall short of the paper, and why'")
@click.option("--no-examples", is_flag=True, help="skip rendering the example WAVs and spectrograms")
def report_command(preset: str, out: Path, docs: Path, notes: Path | None, no_examples: bool) -> None:
    """Write REPORT.md (and docs/figures, docs/audio) from the evaluations' outputs under $PGESAM_HOME/runs."""
    import logging

    from .report import ReportInputs, write_report
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_report(out, docs, ReportInputs(preset=preset), examples=not no_examples,
                        shortfalls=notes.read_text() if notes else "")
    click.echo(f"report written to {path}")


def run() -> None:
    """Entry point with one-line errors for the failures a user can act on."""
    try:
        main(standalone_mode=True)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
