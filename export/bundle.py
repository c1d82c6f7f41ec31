"""`export_bundle`: trained torch checkpoints (codec, VAE, Transformer) -> a self-describing bundle folder.

The bundle (docs/bundle.md) is written into a temporary sibling folder and renamed into place at the end, so a
failed or interrupted export never leaves a half-written bundle where the engine looks. The models are checked
against each other first: same embedding size, note length and pitch range, and (unless told otherwise) the
Transformer's frames must come from this very codec and its timbre points from this very VAE.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pgesam_train.checkpoint import file_sha256
from pgesam_train.codec import Codec, codec_id, find_codec_checkpoint, load_codec, same_encoder
from pgesam_train.config import to_dict
from pgesam_train.transformer import TimbreTransformer, load_transformer
from pgesam_train.vae import VAE, load_vae

from . import codec_graphs, quantize, storage
from .decoder_step import decoder_step_spec, static_decoder_step_spec
from .manifest import (FORMAT, MANIFEST, VERSION, ExportError, GraphSpec, codec_origin, created_by, data_section,
                       export_graph, graph_entry, kv_cache_section, metadata_facts, timbre_map_section,
                       write_manifest)
from .transformer_encoder import transformer_encoder_spec
from .vae_encoder import vae_encoder_spec

log = logging.getLogger("pgesam.export")


@dataclass
class Models:
    """The three torch models of a bundle, the VAE's checkpoint extra (timbre map, classes, latent cache) and the
    Transformer's (codec identity, VAE hash), and where each came from ({"path", "sha256"} per kind)."""
    codec: Codec
    vae: VAE
    vae_extra: dict
    transformer: TimbreTransformer
    transformer_extra: dict
    sources: dict[str, dict]


def _source(path: Path) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}


def resolve_codec(codec_ckpt: Path | None, identity: dict | None) -> tuple[Codec, dict]:
    """The codec to export -> (codec in eval mode, its source entry). Without a checkpoint: the one matching
    the Transformer's codec `identity` under $PGESAM_HOME, else one that needs none (pretrained EnCodec)."""
    path = Path(codec_ckpt) if codec_ckpt is not None else find_codec_checkpoint(identity)
    if path is not None:
        return load_codec(path).eval(), _source(path)
    from pgesam_train.render import find_codec  # matplotlib comes with it: only when needed
    try:
        codec = find_codec(identity)
    except ValueError as e:  # find_codec's message already says to pass --codec PATH
        raise ExportError(str(e)) from e
    return codec.eval(), {"path": None, "sha256": None, "config": to_dict(codec.config)}


def load_models(codec_ckpt: Path | None, vae_ckpt: Path, transformer_ckpt: Path) -> Models:
    """Load the checkpoints on the CPU, in eval mode (codec: see `resolve_codec`)."""
    vae, vae_extra = load_vae(Path(vae_ckpt))
    transformer, tf_extra = load_transformer(Path(transformer_ckpt))
    codec, codec_source = resolve_codec(codec_ckpt, tf_extra.get("codec"))
    sources = {"codec": codec_source, "vae": _source(vae_ckpt), "transformer": _source(transformer_ckpt)}
    return Models(codec, vae.eval(), vae_extra, transformer.eval(), tf_extra, sources)


def check_compatible(m: Models, allow_mismatch: bool = False) -> None:
    """ExportError unless the three models fit together (shapes always; provenance unless `allow_mismatch`)."""
    vc, tc = m.vae.config, m.transformer.config
    if not m.codec.dim == vc.dim == tc.dim:
        raise ExportError(f"embedding sizes differ: codec {m.codec.dim}, VAE {vc.dim}, Transformer {tc.dim}")
    if vc.frames != tc.frames:
        raise ExportError(f"note lengths differ: VAE {vc.frames} frames, Transformer {tc.frames} frames")
    if (vc.pitch_min, vc.n_pitches) != (tc.pitch_min, tc.n_pitches):
        raise ExportError(f"pitch ranges differ: VAE {vc.pitch_min}+{vc.n_pitches}, "
                          f"Transformer {tc.pitch_min}+{tc.n_pitches}")
    problems = []
    trained_on = m.transformer_extra.get("codec")
    if trained_on and not same_encoder(trained_on, codec_id(m.codec)):
        problems.append(f"the Transformer was trained on frames of codec "
                        f"{m.transformer_extra['codec'].get('name')}, not of {codec_id(m.codec)['name']}")
    vae_sha = m.transformer_extra.get("vae_sha256")
    if vae_sha and vae_sha != m.sources.get("vae", {}).get("sha256", vae_sha):
        problems.append(f"the Transformer was conditioned by the VAE at {m.transformer_extra.get('vae')}, "
                        "not by this VAE checkpoint (the map would not match the sounds)")
    if problems and not allow_mismatch:
        raise ExportError("; ".join(problems) + ". Pass the matching checkpoints, or --allow-mismatch to export "
                          "anyway (the bundle will sound wrong)")
    for p in problems:
        log.warning("exporting anyway: %s", p)


def graph_specs(m: Models, static: bool = True) -> list[GraphSpec]:
    """Every graph of the bundle, in the order they are exported."""
    specs = [transformer_encoder_spec(m.transformer), decoder_step_spec(m.transformer)]
    if static:
        specs.append(static_decoder_step_spec(m.transformer))
    return specs + codec_graphs.codec_specs(m.codec) + [vae_encoder_spec(m.vae)]


def build_manifest(m: Models) -> dict:
    """manifest.json without its `graphs` section (docs/bundle.md)."""
    tc, codec = m.transformer.config, m.codec
    return {
        "format": FORMAT, "version": VERSION,
        "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate, "hop": codec.hop, "frames": tc.frames,
        "dim": tc.dim, "pitch_min": tc.pitch_min, "pitch_max": tc.pitch_min + tc.n_pitches - 1,
        "kv_cache": kv_cache_section(tc),
        "codec_stream": codec_graphs.stream_manifest(codec),
        "map": timbre_map_section(m.vae, m.vae_extra),
        "configs": {"codec": to_dict(codec.config), "vae": to_dict(m.vae.config), "transformer": to_dict(tc)},
        "codec": codec_origin(codec, m.sources.get("codec")),
        "data": data_section(m.vae_extra),
        "sources": m.sources,
        "created_by": created_by(),
    }


def write_graphs(m: Models, root: Path, manifest: dict, static: bool = True) -> dict[str, dict]:
    """Export every graph (float32) into `root` with the manifest's facts as metadata -> the manifest's `graphs`."""
    facts = metadata_facts(manifest)
    graphs = {}
    for spec in graph_specs(m, static):
        t0 = time.perf_counter()
        export_graph(spec, root / spec.file, facts)
        graphs[spec.name] = graph_entry(root, spec.file)
        log.info("exported %s (%.1f MB) in %.1f s", spec.file, graphs[spec.name]["bytes"] / 1e6,
                 time.perf_counter() - t0)
    return graphs


def store_weights(root: Path, graphs: dict[str, dict], weights: str) -> dict[str, dict]:
    """Rewrite the float32 graphs (not the variants) with `weights` storage ("fp16": stored as float16,
    computed in float32, see `export.storage`) -> their updated manifest entries."""
    if weights == "fp32":
        return graphs
    out = {}
    for name, entry in graphs.items():
        if "variant_of" not in entry:
            storage.store_fp16(root / entry["file"])
            entry = graph_entry(root, entry["file"])
        out[name] = entry
    return out


def export_models(m: Models, out_dir: Path, variants: Sequence[str] = (), static: bool = True,
                  weights: str = "fp32") -> Path:
    """Write the bundle of in-memory models into `out_dir` (a temporary folder, then renamed). Returns out_dir."""
    out_dir = Path(out_dir).resolve()
    unknown = [v for v in variants if v not in quantize.VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown}; choose from {', '.join(quantize.VARIANTS)}")
    if weights not in storage.WEIGHTS:
        raise ExportError(f"unknown weight storage {weights!r}; choose from {', '.join(storage.WEIGHTS)}")
    _check_target(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            manifest = build_manifest(m)
            manifest["weights"] = weights
            manifest["graphs"] = write_graphs(m, tmp, manifest, static)
            for variant in variants:  # quantised from the float32 graphs, before their storage changes
                manifest["graphs"].update(quantize.write_variant(tmp, manifest, variant))
            manifest["graphs"] = store_weights(tmp, manifest["graphs"], weights)
        write_manifest(tmp, manifest)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_bundle(codec_ckpt: Path | None, vae_ckpt: Path, transformer_ckpt: Path, out_dir: Path,
                  variants: Sequence[str] = (), allow_mismatch: bool = False, static: bool = True,
                  weights: str = "fp32") -> Path:
    """Export three checkpoints into the bundle folder `out_dir` and return it.

    Args:
        codec_ckpt, vae_ckpt, transformer_ckpt: kind "codec" / "vae" / "transformer" checkpoints (codec None:
            the codec the Transformer's latents came from, see `resolve_codec`).
        out_dir: the bundle folder; an existing bundle there is replaced only once the new one is complete.
        variants: extra quantised graphs to add: "int8" (dynamic, for CPU) and/or "fp16" (for CUDA).
        allow_mismatch: export even when the Transformer was trained on another codec's frames or VAE's map.
        static: also export `decoder_step_static` (for CUDA graphs).
        weights: "fp32", or "fp16" to store every graph's weights as float16 (half the size, float32 speed).
    """
    models = load_models(codec_ckpt, vae_ckpt, transformer_ckpt)
    check_compatible(models, allow_mismatch)
    return export_models(models, out_dir, variants, static, weights)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; choose a folder for the bundle")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ExportError(f"{out_dir} is a non-empty folder that is not a bundle; refusing to replace it")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an old bundle there is moved aside first and removed after."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
