"""`pgesam-train dataset build`: an NSynth-format dataset rendered from General-MIDI soundfonts.

Stages: (1) screen every candidate instrument, in parallel per soundfont: is the preset there, is it silent or
clipped, and does a pitch tracker hear the right pitch on `pitch_check_notes` sample notes; (2) split the usable
ones (`splits.assign_splits`); (3) render every note of the chosen instruments, dropping silent, clipped and
mistuned notes with their reason; (4) write `examples.json` per split plus `dataset.json` (config, soundfonts and
licences, drops, summary). Everything is written to `<out>.partial` and renamed at the end.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from ..config import SPLITS, DataConfig, to_dict
from . import nsynth
from .render import InstrumentRenderer
from .soundfonts import GM_FAMILY, gm_source, programs_for, soundfonts_for
from .splits import Candidate, assign_splits


@dataclass
class Screening:
    """What stage 1 found for one candidate instrument."""
    candidate: Candidate | None
    soundfont: str
    program: int
    verdict: str  # ok | missing | silent | clipped | mistuned
    mistuned_pitches: list[int] = field(default_factory=list)
    detail: str = ""


def check_pitches(cfg: DataConfig) -> list[int]:
    """The sample of pitches judged by the tracker: spread evenly over the range, ends included."""
    n = min(cfg.pitch_check_notes, len(cfg.pitches))
    if n <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(cfg.pitches) - 1, n)).astype(int))
    return [cfg.pitches[i] for i in idx]


def _screen_soundfont(args: tuple[str, str, str, list[int], DataConfig]) -> list[Screening]:
    """Stage 1 for every program of one soundfont (runs in a worker process)."""
    name, path, origin, programs, cfg = args
    import torch

    from ..pitch import estimate_pitch
    torch.set_num_threads(1)
    renderer = InstrumentRenderer(Path(path), cfg.sample_rate)
    out = []
    pitches = check_pitches(cfg) or [cfg.pitches[len(cfg.pitches) // 2]]
    for program in programs:
        preset = renderer.preset_name(program)
        if preset is None:
            out.append(Screening(None, name, program, "missing", detail="no preset in bank 0"))
            continue
        cand = Candidate(name, program, GM_FAMILY[program], gm_source(program, origin), origin, preset)
        notes = [renderer.render(program, p, cfg.velocity, cfg.duration_s, cfg.hold_s, cfg.peak_dbfs) for p in pitches]
        if all(n.silent(cfg.silence_dbfs) for n in notes):
            out.append(Screening(cand, name, program, "silent"))
            continue
        if sum(n.clipped for n in notes) > len(notes) // 2:
            out.append(Screening(cand, name, program, "clipped"))
            continue
        off = []
        if cfg.pitch_check_notes > 0:
            for n in notes:
                est = estimate_pitch(n.audio, cfg.sample_rate, start_s=0.2, stop_s=1.0, hop=320)
                if not est.within(n.pitch, cfg.pitch_tolerance_cents):
                    off.append((n.pitch, est.midi))
        verdict = "mistuned" if len(off) > len(notes) // 2 else "ok"
        detail = "; ".join(f"MIDI {p} heard as {m:.2f}" for p, m in off)
        out.append(Screening(cand, name, program, verdict, [p for p, _ in off], detail))
    renderer.close()
    return out


def _render_instruments(args: tuple[str, list[dict], DataConfig, str]) -> list[dict]:
    """Stage 3 for the chosen instruments of one soundfont (worker process). Returns one record per note."""
    path, instruments, cfg, root = args
    renderer = InstrumentRenderer(Path(path), cfg.sample_rate)
    records = []
    for inst in instruments:
        for pitch in cfg.pitches:
            note = renderer.render(inst["program"], pitch, cfg.velocity, cfg.duration_s, cfg.hold_s, cfg.peak_dbfs)
            key = nsynth.note_str(inst["family_str"], inst["source_str"], inst["number"], pitch, cfg.velocity)
            reason = ("silent" if note.silent(cfg.silence_dbfs) else "clipped" if note.clipped
                      else "mistuned" if pitch in inst["mistuned_pitches"] else None)
            if reason is None:
                wav = nsynth.split_dir(Path(root), inst["split"]) / "audio" / f"{key}.wav"
                sf.write(wav, note.audio, cfg.sample_rate, subtype="PCM_16")
            records.append({"note_str": key, "pitch": pitch, "instrument": inst["id"], "dropped": reason})
    renderer.close()
    return records


def _pool(cfg: DataConfig) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may hold torch/OpenMP threads, which do not survive a fork.
    return ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=mp.get_context("spawn"))


def screen(cfg: DataConfig, log=print) -> list[Screening]:
    """Stage 1 over every chosen soundfont, in parallel."""
    programs = programs_for(cfg.families, cfg.programs)
    fonts = soundfonts_for(cfg.soundfonts)
    jobs = [(f.name, str(f.locate()), f.origin, programs, cfg) for f in fonts]  # locate() fails early, clearly
    results: list[Screening] = []
    with _pool(cfg) as pool:
        for name, found in zip([j[0] for j in jobs], pool.map(_screen_soundfont, jobs)):
            counts = Counter(s.verdict for s in found)
            log(f"  screened {name}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
            results.extend(found)
    return results


def number_instruments(chosen: dict[str, list[Candidate]], screenings: list[Screening]) -> list[dict]:
    """Give each chosen instrument its NSynth id and `{family}_{source}_{NNN}` name (deterministic order)."""
    mistuned = {(s.soundfont, s.program): s.mistuned_pitches for s in screenings}
    rows = [(split, c) for split in SPLITS for c in chosen.get(split, [])]
    rows.sort(key=lambda r: (r[1].family, r[1].source, SPLITS.index(r[0]), r[1].soundfont, r[1].program))
    counters: Counter = Counter()
    out = []
    for i, (split, c) in enumerate(rows):
        number = counters[(c.family, c.source)]
        counters[(c.family, c.source)] += 1
        out.append({"id": i, "split": split, "instrument_str": f"{c.family}_{c.source}_{number:03d}",
                    "number": number, "family_str": c.family, "family": nsynth.FAMILIES.index(c.family),
                    "source_str": c.source, "source": nsynth.SOURCES.index(c.source), "soundfont": c.soundfont,
                    "program": c.program, "preset_name": c.preset_name, "origin": c.origin,
                    "mistuned_pitches": mistuned.get((c.soundfont, c.program), [])})
    return out


def _examples(instruments: list[dict], records: list[dict], cfg: DataConfig) -> dict[str, dict]:
    by_id = {inst["id"]: inst for inst in instruments}
    out: dict[str, dict] = {s: {} for s in SPLITS}
    for i, rec in enumerate(sorted(records, key=lambda r: r["note_str"])):
        if rec["dropped"]:
            continue
        inst = by_id[rec["instrument"]]
        out[inst["split"]][rec["note_str"]] = {
            "note": i, "note_str": rec["note_str"], "instrument": inst["id"],
            "instrument_str": inst["instrument_str"], "instrument_source": inst["source"],
            "instrument_source_str": inst["source_str"], "instrument_family": inst["family"],
            "instrument_family_str": inst["family_str"], "pitch": rec["pitch"], "velocity": cfg.velocity,
            "sample_rate": cfg.sample_rate, "qualities": [0] * len(nsynth.QUALITIES), "qualities_str": []}
    return out


def summary_table(examples: dict[str, dict]) -> str:
    """Markdown table: instruments / notes per family and split."""
    counts: dict[tuple[str, str], list[set | int]] = defaultdict(lambda: [set(), 0])
    for split, exs in examples.items():
        for ex in exs.values():
            cell = counts[(ex["instrument_family_str"], split)]
            cell[0].add(ex["instrument"])
            cell[1] += 1
    splits = [s for s in SPLITS if s in examples]
    lines = ["| family | " + " | ".join(f"{s} inst / notes" for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    totals = {s: [0, 0] for s in splits}
    for fam in nsynth.FAMILIES:
        if not any((fam, s) in counts for s in splits):
            continue
        cells = []
        for s in splits:
            insts, notes = counts.get((fam, s), (set(), 0))
            totals[s][0] += len(insts)
            totals[s][1] += notes
            cells.append(f"{len(insts)} / {notes}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{a} / {b}" for a, b in totals.values()) + " |")
    return "\n".join(lines)


def _metadata(cfg: DataConfig, preset_name: str, instruments: list[dict], screenings: list[Screening],
              records: list[dict], examples: dict, seconds: dict[str, float]) -> dict:
    fonts = soundfonts_for(cfg.soundfonts)
    excluded = [{"soundfont": s.soundfont, "program": s.program, "verdict": s.verdict, "detail": s.detail}
                for s in screenings if s.verdict != "ok"]
    dropped = Counter(r["dropped"] for r in records if r["dropped"])
    return {"format": 1, "preset": preset_name, "config": to_dict(cfg),
            "soundfonts": [{"name": f.name, "path": str(f.locate()), "debian_package": f.debian_package,
                            "origin": f.origin, "licence": f.licence} for f in fonts],
            "instruments": instruments, "excluded_instruments": excluded, "dropped_notes": dict(dropped),
            "notes": {s: len(e) for s, e in examples.items()}, "summary": summary_table(examples),
            "seconds": seconds}


def build_dataset(cfg: DataConfig, out: Path, preset_name: str = "custom", force: bool = False,
                  log=print) -> dict:
    """Build the dataset into `out` (refuses to overwrite unless `force`). Returns the metadata dict."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to rebuild it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for s in SPLITS:
        (nsynth.split_dir(tmp, s) / "audio").mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"stage 1/3: screening instruments ({len(cfg.soundfonts)} soundfonts, {cfg.workers} workers)")
    screenings = screen(cfg, log)
    t1 = time.perf_counter()
    usable = [s.candidate for s in screenings if s.verdict == "ok"]
    quotas = dict(zip(("train", "valid", "test"), cfg.instruments_per_split))
    chosen = assign_splits(usable, {"test": quotas["test"], "valid": quotas["valid"], "train": quotas["train"]}, cfg.seed)
    instruments = number_instruments(chosen, screenings)
    log(f"stage 2/3: {len(usable)} usable instruments, {len(instruments)} chosen")
    records = _render_all(cfg, instruments, tmp)
    t2 = time.perf_counter()
    examples = _examples(instruments, records, cfg)
    seconds = {"screen": round(t1 - t0, 1), "render": round(t2 - t1, 1), "total": round(time.perf_counter() - t0, 1)}
    meta = _metadata(cfg, preset_name, instruments, screenings, records, examples, seconds)
    for split, exs in examples.items():
        (nsynth.split_dir(tmp, split) / "examples.json").write_text(json.dumps(exs, indent=1))
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    _replace_dir(tmp, out)
    return meta


def _render_all(cfg: DataConfig, instruments: list[dict], root: Path) -> list[dict]:
    fonts = {f.name: str(f.locate()) for f in soundfonts_for(cfg.soundfonts)}
    jobs = [(fonts[name], [i for i in instruments if i["soundfont"] == name], cfg, str(root)) for name in fonts]
    jobs = [j for j in jobs if j[1]]
    with _pool(cfg) as pool:
        return [rec for recs in pool.map(_render_instruments, jobs) for rec in recs]


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished build into place; an old dataset is removed only after the new one is complete."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
