"""`pgesam-train pipeline`: soundfonts -> dataset -> codec -> latent cache -> VAE -> Transformer -> ONNX bundle.

    pgesam-train pipeline --preset small [--codec-steps N] [--vae-epochs N] [--transformer-steps N]

Each stage is skipped when its output is complete and resumed when it is partial (every trainer checkpoints), so
running the same command again after an interruption continues where it stopped. The time of each stage goes to
$PGESAM_HOME/runs/pipeline-PRESET/pipeline.json, summed over runs.

Stage order follows the data: the latent cache needs the codec's encoder, the VAE needs the cache, the Transformer
needs the frozen VAE, the bundle needs all three. (With the default fixed log-mel encoder the cache does not depend
on codec training, so the stages after `codec` may also be started by hand while the codec trains.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import paths
from .config import SPLITS

log = logging.getLogger(__name__)

STAGES = ("dataset", "codec", "encode", "vae", "transformer", "export")
DATA_PRESET_FOR = {"tiny": "tiny", "small": "default", "paper": "default"}
CODEC_PRESET_FOR = {"tiny": "tiny", "small": "small", "paper": "small"}  # codec presets: tiny, small


@dataclass(frozen=True)
class PipelinePlan:
    """Where each stage reads and writes, and what counts as done, for one model preset."""
    preset: str
    codec_steps: int | None = None
    vae_epochs: int | None = None
    transformer_steps: int | None = None
    threads: int | None = None
    weights: str = "fp16"  # the bundle's weight storage, as shipped (export/storage.py)
    static: bool = False  # also export decoder_step_static (for CUDA graphs); the shipped CPU bundle has none

    @property
    def dataset(self) -> Path:
        return paths.dataset_dir(DATA_PRESET_FOR[self.preset])

    @property
    def codec_checkpoint(self) -> Path:
        return paths.checkpoints_dir("codec", CODEC_PRESET_FOR[self.preset]) / "stft.pt"

    @property
    def vae_dir(self) -> Path:
        return paths.checkpoints_dir("vae", self.preset)

    @property
    def transformer_dir(self) -> Path:
        return paths.checkpoints_dir("transformer", self.preset)

    @property
    def bundle(self) -> Path:
        return paths.home() / "bundles" / self.preset

    @property
    def record(self) -> Path:
        return paths.runs_dir(f"pipeline-{self.preset}") / "pipeline.json"

    def codec_config(self):
        from .codec import codec_preset
        c = codec_preset(CODEC_PRESET_FOR[self.preset], "stft")
        return dataclasses.replace(c, steps=self.codec_steps) if self.codec_steps else c

    def vae_config(self):
        from .config import vae_preset
        c = vae_preset(self.preset)
        return dataclasses.replace(c, epochs=self.vae_epochs) if self.vae_epochs else c

    def transformer_config(self):
        from .config import transformer_preset
        c = transformer_preset(self.preset)
        return dataclasses.replace(c, steps=self.transformer_steps) if self.transformer_steps else c


def _trained_to(path: Path, kind: str, counter: str) -> int:
    """The step or epoch a checkpoint reached (0 when there is none)."""
    if not path.is_file():
        return 0
    from .checkpoint import load_checkpoint
    return int(load_checkpoint(path, kind).get(counter) or 0)


def _latents(plan: PipelinePlan) -> Path:
    from .codec import codec_id, load_codec
    return paths.latents_dir(plan.dataset, codec_id(load_codec(plan.codec_checkpoint))["name"])


def _latents_complete(cache: Path) -> bool:
    from .data.latents import LatentCacheError, load_latents
    try:
        return all(len(load_latents(cache, s)) > 0 for s in SPLITS)
    except LatentCacheError:
        return False


def _newer(target: Path, *sources: Path) -> bool:
    return target.is_file() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources if s.is_file())


# ------------------------------------------------------------------------------------------- the stages
def stage_dataset(plan: PipelinePlan) -> str | None:
    if (plan.dataset / "dataset.json").is_file():
        return "skipped: dataset exists"
    from .config import data_preset
    from .data.build import build_dataset
    partial = plan.dataset.with_name(plan.dataset.name + ".partial")
    build_dataset(data_preset(DATA_PRESET_FOR[plan.preset]), plan.dataset, DATA_PRESET_FOR[plan.preset],
                  force=partial.exists(), log=log.info)
    return None


def stage_codec(plan: PipelinePlan) -> str | None:
    cfg = plan.codec_config()
    if _trained_to(plan.codec_checkpoint, "codec", "step") >= cfg.steps:
        return f"skipped: codec trained to {cfg.steps} steps"
    from .train_codec import train_codec
    train_codec(cfg, plan.dataset, plan.codec_checkpoint, threads=plan.threads, progress=False)
    return None


def stage_encode(plan: PipelinePlan) -> str | None:
    cache = _latents(plan)
    if _latents_complete(cache):
        return f"skipped: latent cache {cache.name} is complete"
    from .codec import load_codec
    from .encode_dataset import encode_dataset
    encode_dataset(plan.dataset, cache, load_codec(plan.codec_checkpoint), progress=False)
    return None


def stage_vae(plan: PipelinePlan) -> str | None:
    from .train_vae import CHECKPOINT_NAME, map_json_path, train_vae
    cfg, ckpt = plan.vae_config(), plan.vae_dir / CHECKPOINT_NAME
    if _trained_to(ckpt, "vae", "epoch") >= cfg.epochs and map_json_path(ckpt).is_file():
        return f"skipped: VAE trained to {cfg.epochs} epochs"
    train_vae(cfg, _latents(plan), plan.vae_dir, resume=ckpt.is_file(), threads=plan.threads, progress=False)
    return None


def stage_transformer(plan: PipelinePlan) -> str | None:
    from .train_transformer import CHECKPOINT_NAME, train_transformer
    from .train_vae import CHECKPOINT_NAME as VAE_NAME
    cfg, ckpt = plan.transformer_config(), plan.transformer_dir / CHECKPOINT_NAME
    if _trained_to(ckpt, "transformer", "step") >= cfg.steps:
        return f"skipped: Transformer trained to {cfg.steps} steps"
    train_transformer(cfg, _latents(plan), plan.vae_dir / VAE_NAME, plan.transformer_dir, resume=ckpt.is_file(),
                      threads=plan.threads)
    return None


def stage_export(plan: PipelinePlan) -> str | None:
    from export.bundle import export_bundle

    from .train_transformer import CHECKPOINT_NAME
    from .train_vae import CHECKPOINT_NAME as VAE_NAME
    vae, transformer = plan.vae_dir / VAE_NAME, plan.transformer_dir / CHECKPOINT_NAME
    if _newer(plan.bundle / "manifest.json", plan.codec_checkpoint, vae, transformer):
        return "skipped: the bundle is newer than every checkpoint"
    export_bundle(plan.codec_checkpoint, vae, transformer, plan.bundle, static=plan.static, weights=plan.weights)
    return None


STAGE_FUNCTIONS: dict[str, Callable[[PipelinePlan], str | None]] = {
    "dataset": stage_dataset, "codec": stage_codec, "encode": stage_encode, "vae": stage_vae,
    "transformer": stage_transformer, "export": stage_export}


# ------------------------------------------------------------------------------------------ the runner
def _load_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"stages": {}}


def _save_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def run_pipeline(plan: PipelinePlan, stages: tuple[str, ...] = STAGES, echo: Callable[[str], None] = print
                 ) -> dict:
    """Run (or resume) the stages in order; returns the record {"preset", "stages": {name: {...}}}.

    A stage that fails leaves its checkpoints for the next run and re-raises; the record keeps the time spent."""
    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {unknown}; choose from {', '.join(STAGES)}")
    record = _load_record(plan.record)
    record["preset"] = plan.preset
    for i, name in enumerate(stages, 1):
        echo(f"[{i}/{len(stages)}] {name} ...")
        entry = record["stages"].setdefault(name, {"seconds": 0.0})
        t0, note = time.monotonic(), None
        try:
            note = STAGE_FUNCTIONS[name](plan)
        except BaseException:
            entry["status"] = "interrupted"
            raise
        finally:
            spent = time.monotonic() - t0
            if note is None:  # the stage worked (or was interrupted): its time counts
                entry["seconds"] = round(entry["seconds"] + spent, 1)
            _save_record(plan.record, record)
        entry["status"] = note or "done"
        _save_record(plan.record, record)
        echo(f"[{i}/{len(stages)}] {name}: {entry['status']} ({spent:.1f} s now, {entry['seconds']:.1f} s of work "
             "in all runs)")
    echo(f"bundle: {plan.bundle}; record: {plan.record}")
    return record
