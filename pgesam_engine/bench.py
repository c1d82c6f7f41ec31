"""`pgesam bench`: every speed and latency figure of the issue's goals, measured in one run on one machine.

    per-graph latency      p50/p95/p99 of single calls at batch 1 (decoder step with a half-full cache)
    decoder step           ms per step over whole 300-step generations at batch 1 and 25
    full note              one note generated and decoded: seconds and real-time factor
    prerender              all pitches of a timbre through the prerenderer (batched generation + decode)
    streaming              seconds from asking for an uncached note to its first audio chunk
    note-on latency        OSC packet arriving on loopback -> first sample of the note in the output block,
                           prerendered notes, null backend; p50/p99 and jitter (p99 - p1); plus the timing error
                           of bundles timetagged 50 ms ahead
    idle                   CPU share and resident memory of a serving engine with nothing to play
    torch ratio            only when pgesam_train and torch are importable and the manifest has the transformer
                           config: the torch uncached reference (random weights, same size) / our full note
"""
from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from .process_stats import memory_mb
from .synth import Synth


def _pct(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1000.0
    p1, p50, p95, p99 = np.percentile(ms, [1, 50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "jitter_ms": float(p99 - p1)}


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def graph_latencies(synth: Synth, repeats: int) -> dict[str, dict]:
    """Single-call latency of every graph at batch 1."""
    m, b = synth.m, synth.bundle
    rng = np.random.default_rng(0)
    z, pidx = np.zeros((1, 2), np.float32), np.zeros(1, np.int64)
    layout = synth.layout
    cross = dict(zip(layout.cross, b.session("transformer_encoder").run(list(layout.cross),
                                                                         {"z": z, "pitch_index": pidx})))
    half = m.frames // 2
    feeds = {
        "transformer_encoder": {"z": z, "pitch_index": pidx},
        "decoder_step": {"frame": np.zeros((1, m.dim), np.float32), "position": np.array(half, np.int64),
                         **cross, **layout.zeros(layout.self_in, 1, half, rng)},
        "decoder_step_static": {"frame": np.zeros((1, m.dim), np.float32), "position": np.array([half], np.int64),
                                **cross, **layout.zeros(layout.self_in, 1, m.kv.max_length)},
        "codec_decoder": {"emb": rng.standard_normal((1, m.dim, m.frames), np.float32)},
        "codec_encoder": {"audio": rng.standard_normal((1, m.note_samples), np.float32) * 0.1},
        "vae_encoder": {"emb": rng.standard_normal((1, m.dim, m.frames), np.float32)},
    }
    out = {}
    for name, feed in feeds.items():
        if b.has(name):
            out[name] = _pct(_timed(lambda s=b.session(name), f=feed: s.run(None, f), repeats))
    if b.has("codec_decoder_stream"):
        from .synth import StreamDecoder
        dec = StreamDecoder(b.session("codec_decoder_stream"), m.stream_state, 1)
        chunk = rng.standard_normal((1, m.dim, synth.stream_chunk), np.float32)
        out[f"codec_decoder_stream ({synth.stream_chunk} frames)"] = _pct(_timed(lambda: dec.push(chunk), repeats))
    return out


def generation(synth: Synth, repeats: int) -> dict[str, float]:
    """Decoder-step ms at batch 1 and 25, full-note seconds/RTF, streaming first-audio time."""
    m = synth.m
    note_s = m.note_samples / m.sample_rate
    out = {}
    for batch in (1, 25):
        points, pitches = np.zeros((batch, 2)), m.pitch_min + np.arange(batch) % m.n_pitches
        secs = min(_timed(lambda: synth.generate(points, pitches), max(1, repeats // 10)))
        out[f"decoder_step_ms_b{batch}"] = 1000.0 * secs / m.frames
    # best of several: one 0.2 s render on a shared 2-core machine varies by +-30 % between runs
    full = min(_timed(lambda: synth.render([[0.0, 0.0]], [m.pitch_min]), max(3, repeats // 4)))
    out["note_s"], out["note_rtf"] = full, full / note_s

    def first_chunk() -> None:
        next(iter(synth.stream((0.1, 0.1), m.pitch_min)))
    out.update({f"stream_first_{k}": v for k, v in _pct(_timed(first_chunk, repeats)).items()})
    return out


def prerender_time(synth: Synth) -> float:
    """Seconds for the prerenderer to fill every pitch of one timbre."""
    from .engine import EngineConfig, prerender_plan
    from .timbre_cache import Prerenderer, TimbreCache
    m, config = synth.m, EngineConfig()
    cache = TimbreCache(m.pitch_min, m.n_pitches, m.note_samples, 2 ** 31)
    batch, workers = prerender_plan(config, synth.device)  # as the engine does
    pre = Prerenderer(synth, cache, batch, config.decode_batch, workers=workers)
    try:
        pre.request((0.2, -0.2))
        pre.wait_idle()
        return pre.last_seconds
    finally:
        pre.close()


def osc_latency(synth: Synth, notes: int, blocksize: int = 256) -> dict[str, float]:
    """Loopback OSC note-ons to a null-backend engine: arrival -> first output sample, and idle CPU / RSS."""
    from .audio import NullBackend
    from .engine import Engine, EngineConfig
    from .osc import Router, build
    from .osc_server import OscServer
    engine = Engine(synth, NullBackend(synth.m.sample_rate, blocksize), EngineConfig())
    server = OscServer(Router(engine), "127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        engine.start()
        engine.prerenderer.wait_idle()
        server.start()
        pitch = synth.m.pitch_min
        for i in range(notes):
            client.sendto(build("/pgesam/note", [pitch + i % synth.m.n_pitches, 100]), server.address)
            time.sleep(0.03)
        for _ in range(max(5, notes // 5)):
            client.sendto(_timed_bundle(pitch, time.time() + 0.05), server.address)
            time.sleep(0.08)
        time.sleep(0.2)
        now, timed = engine.voices.onset_stats(False), engine.voices.onset_stats(True)
        client.sendto(build("/pgesam/all_off", []), server.address)
        time.sleep(0.3)
        cpu0, t0 = time.process_time(), time.perf_counter()
        time.sleep(2.0)
        idle = 100.0 * (time.process_time() - cpu0) / (time.perf_counter() - t0)
        return {"note_on_p50_ms": now.get("p50_ms", float("nan")), "note_on_p99_ms": now.get("p99_ms", float("nan")),
                "note_on_jitter_ms": now.get("jitter_ms", float("nan")), "notes": now.get("count", 0),
                "timed_error_p99_ms": timed.get("p99_ms", float("nan")), "late": engine.scheduler.late,
                "underruns": engine.backend.underruns, "idle_cpu_percent": idle, "rss_mb": memory_mb()["rss_mb"],
                "block_ms": 1000.0 * blocksize / synth.m.sample_rate}
    finally:
        client.close()
        server.stop()
        engine.close()


def _timed_bundle(pitch: int, at: float) -> bytes:
    from pythonosc.osc_bundle_builder import OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder
    b = OscBundleBuilder(at)
    msg = OscMessageBuilder("/pgesam/note")
    msg.add_arg(pitch)
    msg.add_arg(100)
    b.add_content(msg.build())
    return b.build().dgram


def torch_reference(synth: Synth) -> dict[str, object]:
    """The torch uncached reference for one note at the bundle's transformer size (optional, lazy imports)."""
    cfg_dict = synth.m.raw.get("configs", {}).get("transformer") or {}
    if not cfg_dict:
        return {"skipped": "the manifest has no transformer config to size the reference"}
    try:
        import torch
        from pgesam_train.config import TransformerConfig, from_dict
        from pgesam_train.generate import generate_uncached
        from pgesam_train.transformer import TimbreTransformer
    except ImportError as e:
        return {"skipped": f"pgesam_train/torch not importable ({e})"}
    torch.manual_seed(0)
    model = TimbreTransformer(from_dict(TransformerConfig, cfg_dict)).eval()
    z, pitch = torch.zeros(1, 2), torch.tensor([model.config.pitch_min])
    generate_uncached(model, z, pitch, n_frames=5)  # warm-up; one full run is long enough to time
    t0 = time.perf_counter()
    generate_uncached(model, z, pitch)
    return {"torch_uncached_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}


def run_bench(synth: Synth, repeats: int = 20, notes: int = 100, with_torch: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """All figures -> a JSON-ready report."""
    from .engine import EngineConfig, prerender_plan
    b = synth.bundle
    batch, workers = prerender_plan(EngineConfig(), synth.device)
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
                                "provider": b.provider, "step": synth.step_mode, "graphs": b.variant or "float",
                                "step_threads": b.step_threads if synth.device == "cpu" else None,
                                "prerender_batch": batch, "prerender_workers": workers},
                    "bundle": str(synth.bundle.root)}
    t0 = time.perf_counter()

    def stage(what: str) -> None:
        log(f"[{time.perf_counter() - t0:6.1f} s] {what}")
    stage(f"serving: {notes} OSC note-ons over loopback, then idle ...")  # first: RSS of a serving engine
    report["realtime"] = osc_latency(synth, notes)
    stage("timing graphs ...")
    report["graphs"] = graph_latencies(synth, repeats)
    stage("timing generation and streaming ...")
    report["generation"] = generation(synth, repeats)
    stage("timing a 25-pitch prerender ...")
    report["generation"]["prerender_s"] = prerender_time(synth)
    if with_torch:
        stage("timing the torch uncached reference ...")
        ref = torch_reference(synth)
        if "torch_uncached_s" in ref:
            ref["speedup"] = ref["torch_uncached_s"] / report["generation"]["note_s"]
        report["torch"] = ref
    stage("done")
    return report


def markdown(report: dict) -> str:
    """The report as Markdown tables, with the issue's goals beside the figures."""
    g, r = report["generation"], report["realtime"]
    rows = ["| graph (batch 1) | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {v['p99_ms']:.3f} |"
             for k, v in report["graphs"].items()]
    rows += ["", "| measure | value | goal (small bundle, 2 cores) |", "|---|---:|---|",
             f"| decoder step, batch 1 | {g['decoder_step_ms_b1']:.3f} ms | |",
             f"| decoder step, batch 25 | {g['decoder_step_ms_b25']:.3f} ms | |",
             f"| full 4 s note (generate + decode) | {g['note_s']:.3f} s (RTF {g['note_rtf']:.4f}) | <= 0.2 s |",
             f"| 25-pitch prerender | {g['prerender_s']:.2f} s | <= 3 s |",
             f"| streaming: first audio p50 / p99 | {g['stream_first_p50_ms']:.1f} / {g['stream_first_p99_ms']:.1f}"
             f" ms | <= 30 ms |",
             f"| note-on latency p50 / p99 ({r['notes']} notes, block {r['block_ms']:.2f} ms) | "
             f"{r['note_on_p50_ms']:.2f} / {r['note_on_p99_ms']:.2f} ms | <= block + 1 ms |",
             f"| note-on jitter (p99 - p1) | {r['note_on_jitter_ms']:.3f} ms | <= 1 ms |",
             f"| timetagged note timing error p99 | {r['timed_error_p99_ms']:.3f} ms | |",
             f"| late bundles / underruns | {r['late']} / {r['underruns']} | 0 / 0 |",
             f"| idle CPU / RSS | {r['idle_cpu_percent']:.1f} % / {r['rss_mb']:.0f} MB | < 2 % / < 500 MB |"]
    t = report.get("torch")
    if t is not None:
        rows.append(f"| torch uncached reference, one note | {t['torch_uncached_s']:.2f} s ({t['speedup']:.1f}x slower)"
                    f" | >= 10x |" if "speedup" in t else f"| torch uncached reference | {t['skipped']} | |")
    m = report["machine"]
    cpu = (f", {m['step_threads']}-thread step, prerender {m['prerender_workers']} workers of batch "
           f"{m['prerender_batch']}" if m.get("step_threads") else "")
    rows.append(f"\n{m['provider']} ({m['step']} step, {m.get('graphs', 'float')} graphs{cpu}), onnxruntime "
                f"{m['onnxruntime']}, {m['cpus']} CPUs, {m['platform']}; bundle {report['bundle']}")
    return "\n".join(rows)
