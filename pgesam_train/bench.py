"""`pgesam-train bench`: seconds to generate one 300-frame note, uncached vs KV-cached, in one run on one machine.

Methods are registered in `METHODS` by name: a method takes the `BenchSetup` and a batch size and returns a
`Timing`. The torch methods live here; an ONNX method (`onnx-cached`) can be added beside them by the export code,
reading `setup.onnx_bundle`, without touching the loop. Ratios are reported against `torch-uncached`.

`onnx-cached` (`--method onnx-cached`) is the engine's way: the Transformer exported to ONNX (`setup.onnx_bundle`,
or the setup's model exported to a temporary folder), run by onnxruntime with the KV-cached step through the
engine's own IOBinding stepper (`pgesam_engine.synth.DynamicStepper`), as many intra-op threads as torch.

`torch-uncached` is the authors' way: the full forward recomputed for every frame. Batch 1 is always timed in full.
For larger batches, with `uncached_stride` > 1, it times only every stride-th of those forwards (lengths 1, 1+s,
..., frames) and sums their linear interpolation over all lengths: an estimate, labelled as such, that keeps a
batch-25 run to a minute instead of many.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .generate import generate_cached, generate_uncached
from .reports import write_json_markdown
from .transformer import TimbreTransformer


@dataclass
class BenchSetup:
    """What every method needs. `onnx_bundle` is for ONNX methods registered by the export code."""
    model: TimbreTransformer
    frames: int = 300
    repeats: int = 3
    uncached_stride: int = 10  # batches > 1 only; 1 = time the full uncached generation
    seed: int = 0
    onnx_bundle: Path | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """Seconds for one batch of `batch` notes of `frames` frames (the best of `repeats` runs)."""
    method: str
    batch: int
    frames: int
    seconds: float
    note: str = ""

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / self.frames


Method = Callable[[BenchSetup, int], Timing]


def _inputs(setup: BenchSetup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timbre points in the unit disc and pitches spread over the model's range: z (B, 2), pitch (B,)."""
    cfg = setup.model.config
    g = torch.Generator().manual_seed(setup.seed)
    z = (torch.rand(batch, 2, generator=g) - 0.5) * 1.4
    pitch = cfg.pitch_min + torch.arange(batch) % cfg.n_pitches
    return z, pitch


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Lowest wall-clock seconds over `repeats` calls (after one untimed warm-up call)."""
    fn()
    return min(_seconds(fn) for _ in range(repeats))


def torch_cached(setup: BenchSetup, batch: int, cache: str = "inplace") -> Timing:
    """KV-cached generation; `cache` as in `generate_cached` ("inplace" is named plain torch-cached)."""
    z, pitch = _inputs(setup, batch)
    secs = best_of(lambda: generate_cached(setup.model, z, pitch, setup.frames, cache=cache), setup.repeats)
    name = "torch-cached" if cache == "inplace" else f"torch-cached-{cache}"
    return Timing(name, batch, setup.frames, secs)


def torch_uncached(setup: BenchSetup, batch: int) -> Timing:
    z, pitch = _inputs(setup, batch)
    n = setup.frames
    stride = 1 if batch == 1 else setup.uncached_stride
    if stride <= 1:
        secs = best_of(lambda: generate_uncached(setup.model, z, pitch, n), max(1, setup.repeats // 3))
        return Timing("torch-uncached", batch, n, secs, "full generation")
    lengths = sorted(set(range(1, n + 1, stride)) | {n})
    frames = torch.randn(batch, n, setup.model.config.dim, generator=torch.Generator().manual_seed(setup.seed))
    with torch.inference_mode():
        setup.model(z, pitch, frames[:, :1])  # warm-up once; then each length once, as generation meets it
        per_len = [_seconds(lambda t=t: setup.model(z, pitch, frames[:, :t])) for t in lengths]
    secs = float(np.interp(np.arange(1, n + 1), lengths, per_len).sum())
    return Timing("torch-uncached", batch, n, secs, f"estimated: forwards at every {stride}th length, interpolated")


def _onnx_sessions(setup: BenchSetup) -> tuple[object, object, object, str]:
    """(transformer_encoder session, decoder_step session, the cache layout, where they came from), made once
    per setup."""
    if "onnx_sessions" in setup.extra:
        return setup.extra["onnx_sessions"]
    import json
    import tempfile

    import onnxruntime as ort

    from export.decoder_step import decoder_step_spec
    from export.manifest import MANIFEST, export_graph, kv_cache_section
    from export.transformer_encoder import transformer_encoder_spec
    from pgesam_engine.bundle import session_options
    from pgesam_engine.synth import CacheLayout
    if setup.onnx_bundle is not None:
        folder, where = Path(setup.onnx_bundle), f"bundle {setup.onnx_bundle}"
        layout = CacheLayout.read(json.loads((folder / MANIFEST).read_text())["kv_cache"])
    else:
        setup.extra["onnx_tmp"] = tempfile.TemporaryDirectory(prefix="pgesam-bench-")
        folder, where = Path(setup.extra["onnx_tmp"].name), "the timed model, exported"
        for spec in (transformer_encoder_spec(setup.model), decoder_step_spec(setup.model)):
            export_graph(spec, folder / spec.file, {"frames": str(setup.model.config.frames)})
        layout = CacheLayout.read(kv_cache_section(setup.model.config))
    options = session_options(torch.get_num_threads(), cpu_only=True)
    sessions = tuple(ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                     for name in ("transformer_encoder", "decoder_step"))
    setup.extra["onnx_sessions"] = (*sessions, layout, where)
    return setup.extra["onnx_sessions"]


def onnx_cached(setup: BenchSetup, batch: int) -> Timing:
    """A whole note batch through ONNX Runtime: encoder once, then `frames` KV-cached steps with IOBinding."""
    import onnxruntime as ort

    from pgesam_engine.synth import DynamicStepper
    encoder, step, layout, where = _onnx_sessions(setup)
    cfg = setup.model.config
    z, pitch = _inputs(setup, batch)
    feeds = {"z": z.numpy(), "pitch_index": (pitch - cfg.pitch_min).numpy()}

    def generate() -> None:
        cross = dict(zip(layout.cross, map(ort.OrtValue.ortvalue_from_numpy, encoder.run(list(layout.cross), feeds))))
        stepper = DynamicStepper(step, cross, batch, cfg.dim, layout, "cpu")
        for p in range(setup.frames):
            stepper.step(p)
    secs = best_of(generate, setup.repeats)
    return Timing("onnx-cached", batch, setup.frames, secs, f"onnxruntime {ort.__version__}, {where}")


METHODS: dict[str, Method] = {
    "torch-uncached": torch_uncached,
    "torch-cached": torch_cached,
    "torch-cached-dynamic": lambda setup, batch: torch_cached(setup, batch, cache="dynamic"),
    "torch-cached-static": lambda setup, batch: torch_cached(setup, batch, cache="static"),
    "onnx-cached": onnx_cached,
}


def run_bench(setup: BenchSetup, methods: list[str], batches: list[int],
              log: Callable[[str], None] = print) -> dict:
    """Time every method at every batch size -> JSON-ready report with speed-ups over torch-uncached."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; known: {', '.join(METHODS)}")
    setup.model.eval()
    timings: list[Timing] = []
    for batch in batches:
        for name in methods:
            t = METHODS[name](setup, batch)
            log(f"{t.method:22s} batch {t.batch:3d}: {t.seconds:8.3f} s per note batch, "
                f"{t.ms_per_step:7.2f} ms/step {t.note}")
            timings.append(t)
    return {"timings": [asdict(t) | {"ms_per_step": t.ms_per_step} for t in timings],
            "speedup_vs_uncached": _speedups(timings), "machine": _machine(),
            "params": setup.model.num_params(), "frames": setup.frames}


def _speedups(timings: list[Timing]) -> dict[str, float]:
    base = {t.batch: t.seconds for t in timings if t.method == "torch-uncached"}
    return {f"{t.method}@{t.batch}": base[t.batch] / t.seconds for t in timings
            if t.method != "torch-uncached" and t.batch in base}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def markdown(report: dict) -> str:
    """The report as a Markdown table."""
    rows = ["| method | batch | s per note batch | ms per step | speed-up vs uncached | note |",
            "|---|---:|---:|---:|---:|---|"]
    for t in report["timings"]:
        ratio = report["speedup_vs_uncached"].get(f"{t['method']}@{t['batch']}")
        rows.append(f"| {t['method']} | {t['batch']} | {t['seconds']:.3f} | {t['ms_per_step']:.2f} | "
                    f"{'' if ratio is None else f'{ratio:.1f}x'} | {t['note']} |")
    m = report["machine"]
    rows.append(f"\n{report['params']:,} parameters, {report['frames']} frames, torch {m['torch']}, "
                f"{m['threads']} thread(s), {m['platform']}")
    return "\n".join(rows)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write bench.json and bench.md into folder `out`."""
    return write_json_markdown(out, "bench", report, markdown(report))
