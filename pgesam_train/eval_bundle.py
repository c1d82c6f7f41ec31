"""`pgesam-train bundle-pitch`: the pitch of notes an exported bundle renders, as the engine renders them.

The Transformer evaluation judges the torch models; this judges the bundle itself (onnxruntime, its weight
storage, and any quantised variant): every pitch at the map points of a few training instruments, rendered by
`pgesam_engine.Synth` on the CPU, each note's pitch by torchcrepe (within 50 cents, as elsewhere). Several
variants are rendered at the same points, so their rows compare the quality cost of quantisation directly.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .pitch import estimate_pitch, pitch_accuracy

BASE = "float32 graphs"  # the row of the bundle's own graphs (whatever their weight storage)


def pick_instruments(instruments: list[dict], n: int, seed: int) -> list[dict]:
    """`n` of the map's training instruments, drawn without replacement by `seed` (all of them if fewer)."""
    if n < 1:
        raise ValueError(f"need at least one instrument, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(instruments))[:n]
    return [instruments[i] for i in sorted(order)]


def bundle_pitch(bundle: Path, variants: Sequence[str | None] = (None,), instruments: int = 4, seed: int = 0,
                 threads: int | None = None, every: int = 1, echo: Callable[[str], None] | None = None) -> dict:
    """Render every `every`-th pitch at `instruments` training-instrument points with each variant (None: the
    bundle's own graphs) -> {"bundle", "instruments", "rows": {variant: {"notes", "within_50c",
    "median_abs_cents", "seconds"}}}. torchcrepe takes about 1 s a note on one core: most of the time."""
    from pgesam_engine.bundle import Bundle, read_manifest
    from pgesam_engine.synth import Synth
    m = read_manifest(Path(bundle))
    for variant in variants:  # before any rendering
        if variant is not None and not any(k.endswith(f".{variant}") for k in m.raw["graphs"]):
            raise ValueError(f"{bundle} has no {variant!r} variant; export it with --variant {variant}")
    chosen = pick_instruments(list(m.map.instruments), instruments, seed)
    pitches = np.arange(m.pitch_min, m.pitch_max + 1, every)
    rows: dict[str, dict] = {}
    for variant in variants:
        synth = Synth(Bundle(bundle, providers="cpu", threads=threads, variant=variant))
        estimates, targets, seconds = [], [], 0.0
        for inst in chosen:
            points = np.tile(np.array([[inst["x"], inst["y"]]], np.float32), (len(pitches), 1))
            t0 = time.perf_counter()
            audio = synth.render(points, pitches)
            seconds += time.perf_counter() - t0
            estimates += [estimate_pitch(a, m.sample_rate) for a in audio]
            targets += pitches.tolist()
        cents = np.array([abs(e.cents_off(t)) for e, t in zip(estimates, targets)])
        name = variant or BASE
        rows[name] = {"notes": len(targets), "within_50c": pitch_accuracy(estimates, targets),
                      "median_abs_cents": float(np.nanmedian(cents)) if np.isfinite(cents).any() else float("nan"),
                      "seconds": seconds}
        if echo is not None:
            echo(f"{name}: {rows[name]['within_50c']:.3f} within 50 cents ({len(targets)} notes, {seconds:.1f} s)")
    return {"bundle": str(bundle), "instruments": [i["name"] for i in chosen], "seed": seed, "every": every,
            "rows": rows}


def markdown(result: dict) -> str:
    pitches = "all pitches" if result.get("every", 1) == 1 else f"one pitch in {result['every']}"
    lines = [f"Pitch of rendered notes (torchcrepe), {pitches} at {len(result['instruments'])} training "
             f"instruments' points ({', '.join(result['instruments'])}):", "",
             "| graphs | notes | within 50 cents | median abs cents | render seconds |", "|---|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['notes']} | {r['within_50c']:.3f} | {r['median_abs_cents']:.1f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
