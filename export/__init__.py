"""torch -> ONNX export of pGESAM models into a self-describing bundle (one wrapper module per graph).

    export_bundle(codec_ckpt, vae_ckpt, transformer_ckpt, out_dir, variants=())  write a bundle (docs/bundle.md)
    check_bundle(bundle_dir)                                                     compare its graphs with torch

One module per graph: `vae_encoder`, `transformer_encoder`, `decoder_step` (growing and static cache),
`codec_graphs` (encoder, decoder, streaming decoder of any codec backend); `manifest` writes graph files,
their metadata and manifest.json; `quantize` the optional int8 / fp16 variants; `check` the parity checks.
"""
from __future__ import annotations

from .bundle import export_bundle, export_models, load_models
from .check import CheckReport, check_bundle
from .manifest import FORMAT, VERSION, ExportError

__all__ = ["FORMAT", "VERSION", "CheckReport", "ExportError", "check_bundle", "export_bundle", "export_models",
           "load_models"]
