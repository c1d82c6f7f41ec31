"""Generation on the tiny preset: cached == uncached, batched == per-pitch, ONNX-traceable decoder steps, bench."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.decoder_step import DecoderStepGraph, input_names, output_names
from export.transformer_encoder import flatten
from pgesam_train.bench import METHODS, BenchSetup, markdown, run_bench, write_report
from pgesam_train.config import transformer_preset
from pgesam_train.generate import (CACHE_MODES, DecoderStep, EncoderCall, empty_cache, generate, generate_cached,
                                   generate_uncached)
from pgesam_train.transformer import TimbreTransformer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> TimbreTransformer:
    torch.manual_seed(0)
    m = TimbreTransformer(transformer_preset("tiny")).eval()
    m.set_normalization(torch.randn(m.config.dim) * 0.1, 1.5)
    return m


def _cond(cfg, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.tensor([[0.3, -0.2], [-0.5, 0.6], [0.0, 0.9]])[:n]
    return z, torch.tensor([cfg.pitch_min, cfg.pitch_min + 12, cfg.pitch_min + 24])[:n]


def test_cached_equals_uncached(model: TimbreTransformer) -> None:
    """All three cache layouts reproduce the authors' uncached generation over a whole 300-frame note."""
    z, pitch = _cond(model.config)
    ref = generate_uncached(model, z, pitch)
    assert ref.shape == (2, model.config.dim, model.config.frames)
    assert ref.abs().mean() > 1e-2  # not a trivially zero note
    for mode in CACHE_MODES:
        got = generate_cached(model, z, pitch, cache=mode)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"cache={mode}")


def test_batched_equals_per_pitch(model: TimbreTransformer) -> None:
    cfg = model.config
    pitches = [cfg.pitch_min + k for k in (0, 5, 11, 24)]
    batched = generate(model, 0.2, -0.4, pitches, n_frames=60)
    assert batched.shape == (4, cfg.dim, 60)
    for i, p in enumerate(pitches):
        torch.testing.assert_close(batched[i], generate(model, 0.2, -0.4, p, n_frames=60)[0], atol=1e-5, rtol=0)
    assert (batched[0] - batched[3]).abs().max() > 1e-3  # pitches differ
    split = generate(model, 0.2, -0.4, pitches, n_frames=60, batch_size=3)
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=0)


def test_bad_requests_are_errors(model: TimbreTransformer) -> None:
    cfg = model.config
    with pytest.raises(ValueError, match="outside the model's range 48-72"):
        generate(model, 0.0, 0.0, cfg.pitch_min - 1, n_frames=2)
    with pytest.raises(ValueError, match="n_frames"):
        generate(model, 0.0, 0.0, cfg.pitch_min, n_frames=cfg.frames + 1)
    with pytest.raises(ValueError, match="cache must be"):
        generate_cached(model, *_cond(cfg), n_frames=2, cache="paged")
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            generate_uncached(model, *_cond(cfg), n_frames=2)
    finally:
        model.eval()


def _export(module: torch.nn.Module, args: tuple, path: Path, layers: int, static: bool) -> None:
    inputs, outputs = input_names(layers), output_names(layers)
    dynamic = {name: {0: "batch"} for name in inputs[2:] + outputs} | {"frame": {0: "batch"}}
    if not static:
        dynamic |= {n: {0: "batch", 2: "past"} for n in inputs if n.startswith("in_")}
        dynamic |= {n: {0: "batch", 2: "past_plus_1"} for n in outputs if n.startswith("out_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic_cache", "static_cache"])
def test_decoder_step_exports_to_onnx(model: TimbreTransformer, tmp_path: Path, static: bool) -> None:
    """The pure decoder step traces with the legacy exporter (opset 17); ORT generates the torch frames."""
    ort = pytest.importorskip("onnxruntime")
    cfg = model.config
    layers = cfg.n_decoder_layers
    z, pitch = _cond(cfg, 3)
    with torch.no_grad():
        _, cross = EncoderCall(model)(z[:2], pitch[:2])  # trace at batch 2 ...
    trace_kv = empty_cache(cfg, 2, static=True) if static else [
        (torch.randn(2, cfg.n_heads, 5, cfg.head_dim), torch.randn(2, cfg.n_heads, 5, cfg.head_dim))
        for _ in range(layers)]
    path = tmp_path / "decoder_step.onnx"
    args = (torch.zeros(2, cfg.dim), torch.tensor(5 if not static else 3), *flatten(cross), *flatten(trace_kv))
    _export(DecoderStepGraph(model, static), args, path, layers, static)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        _, cross = EncoderCall(model)(z, pitch)  # ... and run at batch 3, from an empty cache
    names = input_names(layers)
    feeds = dict(zip(names[2:], (t.numpy() for t in flatten(cross) + flatten(empty_cache(cfg, 3, static=static)))))
    frame, frames = np.zeros((3, cfg.dim), np.float32), []
    for t in range(25):
        frame, *kv = sess.run(None, {**feeds, "frame": frame, "position": np.array(t, np.int64)})
        feeds |= dict(zip(names[2 + 2 * layers:], kv))
        frames.append(frame)
    ref = generate_cached(model, z, pitch, n_frames=25, cache="dynamic").numpy()
    np.testing.assert_allclose(np.stack(frames, axis=2), ref, atol=1e-5, rtol=0)
    assert all(k.shape == (3, cfg.n_heads, cfg.frames if static else 25, cfg.head_dim) for k in kv)


def test_one_wrapper_for_both_caches(model: TimbreTransformer) -> None:
    """DecoderStep(static=True) writes the preallocated cache at the position; the growing one appends."""
    cfg = model.config
    with torch.no_grad():
        _, cross = EncoderCall(model)(*_cond(cfg))
        frame = torch.randn(2, cfg.dim)
        a, grown = DecoderStep(model)(frame, torch.tensor(0), empty_cache(cfg, 2), cross)
        b, written = DecoderStep(model, static=True)(frame, torch.tensor(0), empty_cache(cfg, 2, static=True), cross)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for (gk, gv), (wk, wv) in zip(grown, written):
        assert gk.shape[2] == 1 and wk.shape[2] == cfg.frames
        torch.testing.assert_close(wk[:, :, :1], gk, atol=0, rtol=0)
        torch.testing.assert_close(wv[:, :, :1], gv, atol=0, rtol=0)
        assert not wk[:, :, 1:].any()


def test_bench_runs_and_reports(model: TimbreTransformer, tmp_path: Path) -> None:
    setup = BenchSetup(model, frames=12, repeats=1, uncached_stride=4)
    report = run_bench(setup, list(METHODS), [1, 3], log=lambda _: None)
    assert {(t["method"], t["batch"]) for t in report["timings"]} == {(m, b) for m in METHODS for b in (1, 3)}
    assert all(t["seconds"] > 0 for t in report["timings"])
    assert set(report["speedup_vs_uncached"]) == {f"{m}@{b}" for m in METHODS if m != "torch-uncached"
                                                  for b in (1, 3)}
    notes = {t["batch"]: t["note"] for t in report["timings"] if t["method"] == "torch-uncached"}
    assert notes[1] == "full generation" and notes[3].startswith("estimated")
    js, md = write_report(report, tmp_path)
    assert js.is_file() and md.read_text() == markdown(report) + "\n"
    assert "| torch-cached | 3 |" in md.read_text()
    with pytest.raises(ValueError, match="unknown bench method"):
        run_bench(setup, ["no-such-method"], [1])


def test_encoder_call_exports_to_onnx(model: TimbreTransformer, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = model.config
    z, pitch = _cond(cfg, 3)
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = ["memory", *(f"cross_{kv}{i}" for i in range(cfg.n_decoder_layers) for kv in "kv")]
        torch.onnx.export(EncoderCall(model), (z[:2], pitch[:2]), str(path), dynamo=False, opset_version=17,
                          input_names=["z", "pitch"], output_names=names,
                          dynamic_axes={"z": {0: "batch"}, "pitch": {0: "batch"}, **{n: {0: "batch"} for n in names}})
    memory, *cross = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"z": z.numpy(), "pitch": pitch.numpy()})
    with torch.no_grad():
        ref_memory, ref_cross = EncoderCall(model)(z, pitch)
    np.testing.assert_allclose(memory, ref_memory.numpy(), atol=1e-5, rtol=0)
    assert len(cross) == 2 * cfg.n_decoder_layers
    for got, ref in zip(cross, flatten(ref_cross)):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)
