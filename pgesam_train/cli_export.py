"""`pgesam-train export`: trained checkpoints -> an ONNX bundle for the engine, and `--check` of a bundle.

Defaults follow `--preset`: the Transformer at $PGESAM_HOME/checkpoints/transformer/PRESET/transformer.pt (the one
`render` uses), the VAE it was trained with (else checkpoints/vae/PRESET/vae.pt), the codec whose frames it was
trained on (found by weights hash under checkpoints/codec), and the bundle at $PGESAM_HOME/bundles/PRESET.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from .config import MODEL_PRESETS

VARIANT_CHOICES = ("int8", "fp16")


def _defaults(preset: str, transformer: Path | None, vae: Path | None) -> tuple[Path, Path]:
    """(Transformer checkpoint, VAE checkpoint) with the preset's defaults filled in."""
    from . import paths
    from .train_transformer import CHECKPOINT_NAME
    from .train_vae import CHECKPOINT_NAME as VAE_NAME
    transformer = transformer or paths.checkpoints_dir("transformer", preset) / CHECKPOINT_NAME
    if not transformer.is_file():
        raise click.ClickException(f"no Transformer checkpoint at {transformer}: train one with "
                                   f"`pgesam-train transformer train --preset {preset}` or pass --transformer")
    if vae is None:
        from .checkpoint import load_checkpoint
        trained_with = load_checkpoint(transformer, "transformer")["extra"].get("vae")
        vae = Path(trained_with) if trained_with and Path(trained_with).is_file() else \
            paths.checkpoints_dir("vae", preset) / VAE_NAME
    return transformer, vae


def _check(bundle: Path, codec: Path | None, vae: Path | None, transformer: Path | None) -> None:
    from export.check import check_bundle
    report = check_bundle(bundle, codec, vae, transformer, log=click.echo)
    click.echo("\n" + report.table())
    if not report.ok:
        raise click.ClickException(f"bundle {bundle} does not match its torch models (see FAIL rows)")
    click.echo(f"\n{bundle}: every graph matches torch")


def _summary(bundle: Path) -> None:
    import json
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key, g in manifest["graphs"].items():
        measured = g.get("measured", {})
        extra = ""
        if "max_abs_error" in measured:
            extra = (f"  max |error| vs fp32 {measured['max_abs_error']:.1e}, {measured['ms_per_call']:.2f} ms/call "
                     f"(fp32 {measured['fp32_ms_per_call']:.2f})")
        elif "error" in measured:
            extra = f"  {measured['error']}"
        click.echo(f"  {g['file']:34s} {g['bytes'] / 1e6:8.2f} MB{extra}")


@click.command("export")
@click.option("--preset", type=click.Choice(MODEL_PRESETS), default="small", show_default=True,
              help="Which checkpoints the defaults point at.")
@click.option("--codec", "codec", type=click.Path(path_type=Path), default=None,
              help="Codec checkpoint (default: the codec that encoded the Transformer's latents).")
@click.option("--vae", "vae", type=click.Path(path_type=Path), default=None,
              help="VAE checkpoint (default: the one the Transformer was trained with).")
@click.option("--transformer", "transformer", type=click.Path(path_type=Path), default=None,
              help="Transformer checkpoint (default: $PGESAM_HOME/checkpoints/transformer/PRESET/transformer.pt).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder (default: $PGESAM_HOME/bundles/PRESET); an old bundle there is replaced.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(VARIANT_CHOICES),
              help="Also write quantised graphs: int8 (dynamic, CPU) and/or fp16 (CUDA). Repeatable.")
@click.option("--allow-mismatch", is_flag=True,
              help="Export even if the Transformer was trained on another codec's frames or VAE's map.")
@click.option("--check", "check_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Check the bundle in DIR against its torch models (max abs error per graph, a whole note).")
@click.option("--weights", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight storage: fp16 halves the bundle (float32 arithmetic, same speed; --check measures the "
                   "rounding's cost).")
@click.option("--static/--no-static", default=True, show_default=True,
              help="Include decoder_step_static (static shapes, for CUDA graphs).")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
def export_command(preset: str, codec: Path | None, vae: Path | None, transformer: Path | None, out: Path | None,
                   variants: tuple[str, ...], allow_mismatch: bool, check_dir: Path | None, weights: str,
                   static: bool, threads: int | None) -> None:
    """Export codec, VAE and Transformer to an ONNX bundle for the realtime engine (or check one)."""
    from .training import set_threads
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(threads)
    if check_dir is not None and out is None:
        _check(check_dir, codec, vae, transformer)
        return
    from export.bundle import export_bundle

    from . import paths
    transformer, vae = _defaults(preset, transformer, vae)
    out = out or paths.home() / "bundles" / preset
    bundle = export_bundle(codec, vae, transformer, out, variants=variants, allow_mismatch=allow_mismatch,
                           static=static, weights=weights)
    click.echo(f"bundle written to {bundle}:")
    _summary(bundle)
    if check_dir is not None:
        _check(check_dir, codec, vae, transformer)
