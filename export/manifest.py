"""Graph files and the manifest of a bundle (docs/bundle.md, format version 2).

`timbre_map_section`, `data_section` and `codec_origin` say where the model came from: the training instruments'
centroids with their soundfont presets, the soundfonts' licences, and the codec's weights.

`export_graph` traces one wrapper module into an ONNX file with the legacy exporter (dynamo=False: it handles the
KV-cached step and the codecs; see the field notes) and writes the bundle's key facts into its metadata
(sherpa-onnx habit), so a graph carried away from its manifest still says what it is. `graph_entry` describes a
written file for manifest.json: SHA-256, size and the symbolic shapes of its inputs and outputs.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from pgesam_engine.hashing import sha256_of
from pgesam_train.codec import Codec, codec_id
from pgesam_train.config import TransformerConfig
from pgesam_train.data.latents import LatentCacheError, load_latents, read_meta
from pgesam_train.transformer import N_COND_TOKENS

FORMAT = "pgesam-bundle"
VERSION = 2  # 2: one [B, H, length, hd] key and value tensor per decoder layer (1: one stacked cache tensor)
OPSET = 17
MANIFEST = "manifest.json"
META_KEYS = ("sample_rate", "frame_rate", "hop", "frames", "dim", "pitch_min", "pitch_max")
KV_LAYOUT = ("batch", "heads", "length", "head_dim")  # axes of every cache tensor


class ExportError(ValueError):
    """Models that cannot be exported together, or a graph that fails to export; the message says what to do."""


def created_by() -> str:
    """"pgesam-train export <package version>"."""
    try:
        version = importlib_metadata.version("pgesam-rt")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return f"pgesam-train export {version}"


@dataclass
class GraphSpec:
    """One graph to export: its wrapper module, example inputs, names, and which axes are dynamic.

    `dynamic_axes` maps an input or output name to {axis: symbolic name}, e.g. {"emb": {0: "B", 2: "T"}};
    `metadata` is written into the graph beside the bundle's facts.
    """
    name: str
    module: nn.Module
    args: tuple[Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def export_graph(spec: GraphSpec, path: Path, facts: dict[str, str]) -> Path:
    """Trace `spec.module` (eval mode, no gradients) into `path` (opset 17), check it, and write `facts` plus
    pgesam_format / pgesam_version / graph into its metadata. Returns `path`."""
    module = spec.module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python-side shape arithmetic are expected
            torch.onnx.export(module, spec.args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=spec.inputs, output_names=spec.outputs, dynamic_axes=spec.dynamic_axes,
                              do_constant_folding=True)
    except Exception as e:  # the tracer raises many unrelated types
        raise ExportError(f"exporting {spec.name} to ONNX failed: {type(e).__name__}: {e}") from e
    set_metadata(path, {**facts, **spec.metadata, "graph": spec.name})
    return path


def set_metadata(path: Path, facts: dict[str, str]) -> None:
    """Rewrite `path` with pgesam metadata (replacing any earlier pgesam keys) after an ONNX checker pass."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    keep = [p for p in model.metadata_props if p.key not in facts and not p.key.startswith("pgesam_")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in {"pgesam_format": FORMAT, "pgesam_version": str(VERSION), **facts}.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))


def cross_names(layers: int) -> list[str]:
    """cross_k0, cross_v0, cross_k1, ...: every decoder layer's cross-attention keys and values, in order."""
    return [f"cross_{kv}{i}" for i in range(layers) for kv in "kv"]


def self_names(prefix: str, layers: int) -> list[str]:
    """in_self_k0, in_self_v0, ... (prefix "in") or out_self_k0, ... (prefix "out"): the self-attention cache."""
    return [f"{prefix}_self_{kv}{i}" for i in range(layers) for kv in "kv"]


def kv_cache_section(cfg: TransformerConfig) -> dict:
    """The manifest's `kv_cache` for a TransformerConfig: geometry, the axes of every cache tensor, the names of
    the cross-attention tensors (transformer_encoder outputs = decoder step inputs) and of each self-attention
    cache input with the step output that replaces it."""
    layers = cfg.n_decoder_layers
    return {"layers": layers, "heads": cfg.n_heads, "head_dim": cfg.head_dim, "encoder_length": N_COND_TOKENS,
            "max_length": cfg.frames, "layout": list(KV_LAYOUT), "cross": cross_names(layers),
            "self": [list(p) for p in zip(self_names("in", layers), self_names("out", layers))]}


def kv_metadata(kv: dict) -> dict[str, str]:
    """The manifest's kv_cache as ONNX metadata of the Transformer graphs (comma-separated names)."""
    return {"kv_layout": ",".join(kv["layout"]), "kv_cross": ",".join(kv["cross"]),
            "kv_self_in": ",".join(i for i, _ in kv["self"]), "kv_self_out": ",".join(o for _, o in kv["self"])}


def metadata_facts(manifest: dict) -> dict[str, str]:
    """The key facts every graph carries, taken from the manifest's top level, plus the codec backend."""
    facts = {k: str(manifest[k]) for k in META_KEYS}
    facts["codec_backend"] = str(manifest["codec"]["backend"])
    facts["created_by"] = str(manifest["created_by"])
    return facts



def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def graph_entry(root: Path, file: str) -> dict:
    """Manifest entry of root/file: {"file", "sha256", "bytes", "inputs", "outputs", "dtypes"}; shapes use
    symbolic names for dynamic axes (B, T, P, ...)."""
    path = Path(root) / file
    model = onnx.load(str(path), load_external_data=False)
    values = list(model.graph.input) + list(model.graph.output)
    return {"file": file, "sha256": sha256_of(path), "bytes": path.stat().st_size,
            "inputs": {v.name: _shape(v) for v in model.graph.input},
            "outputs": {v.name: _shape(v) for v in model.graph.output},
            "dtypes": {v.name: _dtype(v) for v in values}}


def write_manifest(root: Path, manifest: dict) -> Path:
    """Write root/manifest.json (via a temporary file and rename)."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root: Path) -> dict:
    """root/manifest.json as a dict, with a clear error when it is missing or not a pgesam bundle."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{root} is not a bundle: it has no {MANIFEST} (run `pgesam-train export`)")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ExportError(f"{path} is {raw.get('format')!r} version {raw.get('version')}, this exporter knows "
                          f"{FORMAT!r} version {VERSION}")
    return raw


# ------------------------------------------------------------------------------------------- provenance
def dataset_json(vae_extra: dict) -> tuple[dict | None, str]:
    """The dataset.json of the data the VAE was trained on (via its latent cache) -> (dict or None, dataset path)."""
    try:
        dataset = str(read_meta(Path(vae_extra.get("latents", ""))).get("dataset", ""))
    except (LatentCacheError, OSError):
        return None, ""
    path = Path(dataset) / "dataset.json"
    return (json.loads(path.read_text()) if path.is_file() else None), dataset


def _stored_map(vae: torch.nn.Module, vae_extra: dict) -> dict:
    if vae_extra.get("map"):
        return vae_extra["map"]
    if vae_extra.get("latents") and vae_extra.get("classes"):  # a checkpoint saved before training finished
        from pgesam_train.train_vae import timbre_map
        try:
            return timbre_map(vae, load_latents(Path(vae_extra["latents"]), "train"), vae_extra["classes"])
        except (LatentCacheError, OSError) as e:
            raise ExportError(f"the VAE checkpoint has no timbre map and its latent cache cannot be read ({e})") from e
    raise ExportError("the VAE checkpoint has no timbre map (its training did not finish): finish `pgesam-train vae "
                      "train` first")


def timbre_map_section(vae: torch.nn.Module, vae_extra: dict) -> dict:
    """The manifest's `map`: bounds and radius of the training notes' mu, and every training instrument's
    centroid {name, family, x, y, instrument, n_notes, soundfont, program, preset} (latent units)."""
    stored = _stored_map(vae, vae_extra)
    data, _ = dataset_json(vae_extra)
    details = {i["instrument_str"]: i for i in (data or {}).get("instruments", [])}
    instruments = []
    for row in stored["instruments"]:
        if not row.get("n_notes"):
            continue  # no training note: no centroid
        d = details.get(row["instrument_str"], {})
        instruments.append({"name": row["instrument_str"], "family": row["family_str"], "x": row["x"], "y": row["y"],
                            "instrument": row["instrument"], "n_notes": row["n_notes"],
                            "soundfont": d.get("soundfont"), "program": d.get("program"),
                            "preset": d.get("preset_name")})
    bounds = stored["bounds"]
    return {"bounds": {"x": list(bounds["x"]), "y": list(bounds["y"])}, "radius": float(bounds["radius"]),
            "units": "VAE latent mean (mu) of the training notes", "instruments": instruments}


def data_section(vae_extra: dict) -> dict:
    """The manifest's `data`: the dataset, its latent cache and the licence of every soundfont it was rendered
    from (from the dataset's own dataset.json)."""
    data, dataset = dataset_json(vae_extra)
    out = {"dataset": Path(dataset).name if dataset else None, "dataset_path": dataset or None,
           "latents": vae_extra.get("latents"), "licences": []}
    if data is None:
        out["note"] = "dataset.json not found: the training data's licences are unknown"
        return out
    out["preset"] = data.get("preset")
    out["licences"] = [{"soundfont": f["name"], "licence": f["licence"], "origin": f.get("origin"),
                        "debian_package": f.get("debian_package")} for f in data.get("soundfonts", [])]
    return out


def codec_origin(codec: Codec, source: dict | None) -> dict:
    """The manifest's `codec`: backend, where its weights come from, their hash and the checkpoint file."""
    ident = codec_id(codec)
    cfg = codec.config
    if cfg.backend == "encodec" and cfg.encodec_pretrained:
        origin = "Meta's EnCodec 24 kHz (encodec_24khz-d7cc33bc.th), encoder and decoder without the quantizer"
        licence = "see https://github.com/facebookresearch/encodec (LICENSE)"
    else:
        origin = f"{cfg.backend} codec trained with `pgesam-train codec train` (pgesam-rt)"
        licence = "MIT (pgesam-rt); trained on the data listed under `data`"
    return {"backend": cfg.backend, "name": ident["name"], "origin": origin, "licence": licence,
            "weights": ident["weights_sha256"], "checkpoint": (source or {}).get("path")}
