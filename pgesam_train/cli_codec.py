"""`pgesam-train codec {train,eval,bench}` and the `dataset encode` command (registered by pgesam_train.cli)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from .codec import Codec

from . import paths
from .codecs import BACKENDS  # torch-free registry; the codec modules are imported inside the commands

NO_CHECKPOINT_BACKENDS = ("griffinlim", "encodec")  # usable without a trained checkpoint (encodec: pretrained)


def default_checkpoint(backend: str, preset: str, encoder: str = "mel") -> Path:
    """Where `codec train` writes unless --out is given: <home>/checkpoints/codec/<preset>/<backend>[-learned].pt."""
    suffix = "-learned" if backend == "stft" and encoder == "learned" else ""
    return paths.checkpoints_dir("codec", preset) / f"{backend}{suffix}.pt"


def codec_from_options(checkpoint: Path | None, backend: str | None, preset: str) -> "Codec":
    """A codec from --checkpoint, or built from --backend/--preset for backends that need no training."""
    from .codec import build_codec, codec_preset, load_codec
    if checkpoint is not None:
        return load_codec(checkpoint)
    if backend not in NO_CHECKPOINT_BACKENDS:
        raise click.UsageError(f"give --checkpoint (a trained codec), or --backend one of {NO_CHECKPOINT_BACKENDS}")
    return build_codec(codec_preset(preset, backend)).eval()


def _echo_json(d: dict) -> None:
    click.echo(json.dumps(d, indent=1, default=str))


@click.group("codec")
def codec_group() -> None:
    """Train, evaluate and benchmark the audio codec (24 kHz <-> 128 x 75 frames/s)."""


@codec_group.command("train")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="stft", show_default=True)
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--encoder", type=click.Choice(["mel", "learned"]), default=None,
              help="stft backend: fixed log-mel (preset default) or learned encoder")
@click.option("--width", type=click.IntRange(8), default=None, help="stft backend: ConvNeXt width (preset's)")
@click.option("--blocks", type=click.IntRange(1), default=None, help="stft backend: ConvNeXt blocks (preset's)")
@click.option("--refine-iters", type=click.IntRange(0), default=None,
              help="stft backend: phase-refinement iterations after the head (preset's; 0 = one-pass phase)")
@click.option("--loss-mag", type=click.FloatRange(0), default=None,
              help="stft backend: weight of the head-magnitude loss (preset's; 0 = off)")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="peak learning rate (preset's)")
@click.option("--from-scratch", is_flag=True,
              help="encodec backend: random init (the EnCodec architecture trained by us) instead of Meta's weights")
@click.option("--n-filters", type=click.IntRange(1), default=None,
              help="encodec backend with --from-scratch: SEANet base width (Meta's weights: 32)")
@click.option("--dataset", type=click.Path(path_type=Path), default=None, help="NSynth-format folder")
@click.option("--steps", type=int, default=None, help="train up to this step (default: the preset's)")
@click.option("--minutes", type=float, default=None, help="stop after this many minutes of wall time")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="checkpoint (resumed if it exists)")
@click.option("--save-every", type=int, default=500, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
def train_cmd(backend: str, preset: str, encoder: str | None, width: int | None, blocks: int | None,
              refine_iters: int | None, loss_mag: float | None, lr: float | None, from_scratch: bool,
              n_filters: int | None, dataset: Path | None, steps: int | None, minutes: float | None,
              out: Path | None, save_every: int, threads: int | None) -> None:
    """Train a codec on the dataset's train split (resumes from --out if it exists).

    A resume keeps the architecture; --steps, --lr and --loss-mag may change (a fine-tune: copy a checkpoint,
    e.g. the shipped checkpoints/small/codec-stft.pt, to --out first)."""
    from .codec import codec_preset
    from .train_codec import train_codec
    if backend == "griffinlim":
        raise click.UsageError("the griffinlim floor needs no training: `pgesam-train codec eval` always reports it")
    if (from_scratch or n_filters is not None) and backend != "encodec":
        raise click.UsageError("--from-scratch and --n-filters are options of --backend encodec")
    if loss_mag and backend != "stft":
        raise click.UsageError("--loss-mag is an option of --backend stft (it supervises the stft head)")
    overrides = {"encoder": encoder, "width": width, "n_blocks": blocks, "refine_iters": refine_iters,
                 "loss_mag": loss_mag, "lr": lr, "steps": steps,
                 "encodec_pretrained": False if from_scratch else None, "encodec_n_filters": n_filters}
    config = dataclasses.replace(codec_preset(preset, backend),
                                 **{k: v for k, v in overrides.items() if v is not None})
    out = out or default_checkpoint(backend, preset, config.encoder)
    dataset = dataset or paths.dataset_dir("default")
    _echo_json(train_codec(config, dataset, out, minutes=minutes, save_every=save_every, threads=threads))


def _names(checkpoints: tuple[Path, ...]) -> list[str]:
    stems = [p.stem for p in checkpoints]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in checkpoints]


@codec_group.command("eval")
@click.option("--checkpoint", "checkpoints", type=click.Path(path_type=Path), multiple=True,
              help="codec checkpoint(s); the ground truth and the Griffin-Lim floor are always included")
@click.option("--backend", "backends", type=click.Choice(["encodec"]), multiple=True,
              help="also evaluate a backend that needs no checkpoint (encodec: pretrained)")
@click.option("--dataset", type=click.Path(path_type=Path), default=None)
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate this many notes spread over the split")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="output folder")
@click.option("--pitch-model", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--examples", type=int, default=3, show_default=True, help="notes saved as PNG + WAV")
def eval_cmd(checkpoints: tuple[Path, ...], backends: tuple[str, ...], dataset: Path | None, split: str,
             limit: int | None, out: Path | None, pitch_model: str, examples: int) -> None:
    """Compare codecs on held-out notes: mel L1, MR-STFT, SI-SDR, pitch preservation."""
    from .codec import load_codec
    from .eval_codec import evaluate_codecs, markdown_table
    codecs: dict[str, "Codec"] = {name: load_codec(p) for name, p in zip(_names(checkpoints), checkpoints)}
    codecs.update({b: codec_from_options(None, b, "small") for b in backends})
    out = out or paths.runs_dir(f"codec-eval-{split}")
    results = evaluate_codecs(codecs, dataset or paths.dataset_dir("default"), out, split=split, limit=limit,
                              n_examples=examples, pitch_model=pitch_model)
    click.echo(markdown_table(results))
    click.echo(f"written to {out}")


@codec_group.command("bench")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="stft", show_default=True,
              help="without --checkpoint: an untrained codec of this backend (same speed as a trained one)")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--frames", type=int, default=300, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
def bench_cmd(checkpoint: Path | None, backend: str, preset: str, frames: int, batch: int, threads: int) -> None:
    """ONNX Runtime decode speed of a codec against realtime."""
    from .codec import build_codec, codec_preset, load_codec
    from .eval_codec import bench_decode
    codec = load_codec(checkpoint) if checkpoint else build_codec(codec_preset(preset, backend)).eval()
    _echo_json(bench_decode(codec, frames=frames, batch=batch, threads=threads))


@click.command("encode")
@click.option("--dataset", type=click.Path(path_type=Path), default=None, help="NSynth-format folder")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="trained codec checkpoint")
@click.option("--backend", type=click.Choice(NO_CHECKPOINT_BACKENDS), default=None,
              help="instead of --checkpoint: griffinlim (log-mel) or encodec (pretrained)")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="latent cache folder")
@click.option("--batch-size", type=int, default=16, show_default=True)
def dataset_encode_cmd(dataset: Path | None, checkpoint: Path | None, backend: str | None, preset: str,
                       out: Path | None, batch_size: int) -> None:
    """Encode every note of every split into a latent cache (refuses to mix codecs in one cache)."""
    from .codec import codec_id
    from .encode_dataset import encode_dataset
    codec = codec_from_options(checkpoint, backend, preset)
    dataset = dataset or paths.dataset_dir("default")
    out = out or paths.latents_dir(dataset, codec_id(codec)["name"])
    _echo_json(encode_dataset(dataset, out, codec, batch_size=batch_size))
