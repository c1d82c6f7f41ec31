"""Optional quantised variants of the Transformer graphs, written beside the float32 originals.

    int8   dynamic quantisation (onnxruntime.quantization.quantize_dynamic): weights of MatMul/Gemm with a
           constant operand stored as int8 with one scale per output channel, activations quantised per call.
           For CPU, and only the decoder step: it runs 300 times a note, the encoder once (its int8 copy would
           save about 1 ms a note and cost 4 MB of the shipped bundle's 64).
    fp16   float16 weights and arithmetic with float32 inputs and outputs (onnxruntime's float16 converter,
           keep_io_types), so the engine binds the same float32 buffers. For CUDA; on a CPU build of
           onnxruntime many float16 kernels fall back to float32 or are missing, so its CPU timing says little.

Only the graphs on the per-note hot path are quantised (`VARIANT_GRAPHS`); the codec graphs stay float32 (their
STFT phase runs in float64 and a quantised vocoder is audibly worse). Each variant's manifest entry records its
largest deviation from the float32 graph on one random call and both graphs' time per call on this machine.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pgesam_engine.synth import CacheLayout

from .manifest import ExportError, graph_entry, metadata_facts, set_metadata

log = logging.getLogger("pgesam.export")
VARIANTS = ("int8", "fp16")
VARIANT_GRAPHS = {"int8": ("decoder_step",),
                  "fp16": ("transformer_encoder", "decoder_step", "decoder_step_static")}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of src -> dst (only matrix products with a constant weight). Per-channel weight
    scales: on the shipped model per-tensor ones moved the step's output by 0.05 and cost 2 of 200 notes their
    pitch; per-channel moves it by 0.03 and cost none (`pgesam-train bundle-pitch --variant int8`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor (and advice) on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def convert_fp16(src: Path, dst: Path) -> None:
    """float16 copy of src -> dst with float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    model.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(model.model, str(dst))


def example_feeds(manifest: dict, graph: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one call of a Transformer graph at `batch`, the step at half the note's length."""
    rng = np.random.default_rng(seed)
    kv, dim = manifest["kv_cache"], manifest["dim"]
    n_pitches = manifest["pitch_max"] - manifest["pitch_min"] + 1
    conditions = {"z": rng.uniform(-1, 1, (batch, 2)).astype(np.float32),
                  "pitch_index": rng.integers(0, n_pitches, batch).astype(np.int64)}
    if graph == "transformer_encoder":
        return conditions
    layout = CacheLayout.read(kv)
    half = manifest["frames"] // 2
    cross = layout.zeros(layout.cross, batch, kv["encoder_length"], rng)
    frame = rng.standard_normal((batch, dim)).astype(np.float32)
    if graph == "decoder_step":
        return {"frame": frame, "position": np.array(half, np.int64), **cross,
                **layout.zeros(layout.self_in, batch, half, rng)}
    if graph == "decoder_step_static":
        return {"frame": frame, "position": np.array([half], np.int64), **cross,
                **layout.zeros(layout.self_in, batch, kv["max_length"], rng)}
    raise ExportError(f"no example inputs for graph {graph!r}")


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ms_per_call(session: ort.InferenceSession, feeds: dict, repeats: int = 20) -> float:
    """Median milliseconds of one call (after one warm-up call)."""
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def compare(reference: Path, variant: Path, feeds: dict) -> dict:
    """Largest absolute deviation of every output of `variant` from `reference`, and both graphs' ms per call.
    Returns {"max_abs_error", "ms_per_call", "fp32_ms_per_call"} ("error" instead when the variant cannot run
    on this onnxruntime build)."""
    ref = _session(reference)
    try:
        var = _session(variant)
        outs = var.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - a missing float16 kernel on CPU is reported, not fatal
        return {"error": f"cannot run on {ort.get_device()} onnxruntime: {str(e).splitlines()[0]}"}
    expected = ref.run(None, feeds)
    err = max(float(np.max(np.abs(o.astype(np.float64) - e))) for o, e in zip(outs, expected))
    return {"max_abs_error": err, "ms_per_call": ms_per_call(var, feeds), "fp32_ms_per_call": ms_per_call(ref, feeds)}


def write_variant(root: Path, manifest: dict, variant: str) -> dict[str, dict]:
    """Write `<graph>.<variant>.onnx` for each graph of VARIANT_GRAPHS[variant] that the bundle has, with the
    bundle's metadata -> manifest entries keyed "<graph>.<variant>" (with "variant_of" and the measurements)."""
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    convert = quantize_int8 if variant == "int8" else convert_fp16
    entries = {}
    for graph in VARIANT_GRAPHS[variant]:
        if graph not in manifest["graphs"]:
            continue
        src, file = root / manifest["graphs"][graph]["file"], f"{graph}.{variant}.onnx"
        convert(src, root / file)
        set_metadata(root / file, {**metadata_facts(manifest), "graph": graph, "variant": variant})
        report = compare(src, root / file, example_feeds(manifest, graph))
        entries[f"{graph}.{variant}"] = {**graph_entry(root, file), "variant_of": graph, "measured": report}
        log.info("%s: %s", file, report)
    return entries
