"""`pgesam-train report`: REPORT.md and its figures and example audio under docs/, from the evaluations' outputs.

The report reruns no evaluation: it reads what the evaluation commands wrote under $PGESAM_HOME/runs (each section
names the command that produced its numbers, and says which command to run when its input is missing), and
renders with the trained models only what no evaluation writes: spectrograms of generated vs real notes, the
pitch-accuracy-by-pitch plot, and the example WAVs (docs/audio/), including an interpolation walk.

Every text input it reads (the evaluations' Markdown and JSON, dataset.json) is copied into docs/results/, which is
committed. On a machine whose $PGESAM_HOME lacks a run (a fresh clone, a wiped cache), the report reads that run's
committed copy instead and says so in its section, so regenerating REPORT.md after one new evaluation does not
drop the tables of the others.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paths
from .config import vae_preset
from .reports import write_text_atomically

log = logging.getLogger(__name__)

FIGURES, AUDIO, RESULTS = "figures", "audio", "results"
EXAMPLE_SECONDS = 2.0  # example WAVs keep the first 2 s of each note (the repo stays small)


@dataclass
class ReportInputs:
    """Where the report reads from (defaults: the `small` preset's standard places under $PGESAM_HOME)."""
    preset: str = "small"
    dataset: Path = field(default_factory=lambda: paths.dataset_dir("default"))
    runs: Path = field(default_factory=lambda: paths.runs_dir(""))
    snapshot: Path | None = None  # committed copies of the inputs (docs/results), read where a run is missing
    used: dict[str, Path] = field(default_factory=dict)  # snapshot name -> the file read for it

    def run(self, name: str) -> Path:
        return self.runs / name

    def find(self, live: Path, name: str, like: str | None = None) -> Path:
        """The input file `live` if it exists, else its committed copy `name` under the snapshot when there is one;
        with `like`, from wherever the input `like` (read before, from the same run) came, so one section never
        mixes a live run with an old copy. Records which was read (see `save_snapshot`)."""
        copy = self.snapshot / name if self.snapshot is not None else None
        if like is not None:
            use_copy = self.from_snapshot(like)
        else:
            use_copy = not Path(live).is_file() and copy is not None and copy.is_file()
        chosen = copy if use_copy and copy is not None else Path(live)
        self.used[name] = chosen
        return chosen

    def from_snapshot(self, name: str) -> bool:
        return self.snapshot is not None and self.used.get(name, Path()).is_relative_to(self.snapshot)

    def provenance(self, *names: str) -> str:
        """A note for a section whose inputs came from the committed snapshot ("" otherwise)."""
        copied = [n for n in names if self.from_snapshot(n)]
        if not copied:
            return ""
        return (f"*From the committed copy `docs/{RESULTS}/{copied[0]}`: the run itself is not on the machine that "
                "wrote this report.*\n\n")

    @property
    def codec_eval(self) -> Path:
        return self.run("codec-eval-test")

    @property
    def vae_eval(self) -> Path:
        return self.run(f"vae-eval-{self.preset}")

    @property
    def ablations(self) -> Path:
        return self.run(f"vae-ablate-{self.preset}")

    @property
    def transformer_eval(self) -> Path:
        return self.run(f"transformer-eval-{self.preset}")

    @property
    def engine_bench(self) -> Path:
        return self.run("engine-bench") / "bench.json"

    @property
    def bundle_pitch(self) -> Path:
        return self.run(f"bundle-pitch-{self.preset}.json")

    @property
    def torch_bench(self) -> Path:
        return self.run(f"bench-{self.preset}")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return None


def _pending(command: str) -> str:
    return f"*Not measured yet.* Run `{command}`, then `pgesam-train report` again."


def _copy_figure(src: Path | None, docs: Path, name: str, keep_committed: bool = False) -> str | None:
    """Copy a PNG into docs/figures/ -> its Markdown image link relative to REPORT.md, or None if missing.

    keep_committed: the section's text came from the committed snapshot, so the figure already in docs/figures
    (written from the same run) stays linked when `src` is gone.
    """
    dst = docs / FIGURES / name
    if src is None or not Path(src).is_file():
        return f"![{name}]({docs.name}/{FIGURES}/{name})" if keep_committed and dst.is_file() else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return f"![{name}]({docs.name}/{FIGURES}/{name})"


# -------------------------------------------------------------------------------------------- sections
def section_data(inp: ReportInputs) -> str:
    meta = _read_json(inp.find(inp.dataset / "dataset.json", "dataset.json"))
    if meta is None:
        return "## Data\n\n" + _pending("pgesam-train dataset build --preset default")
    rows = ["| soundfont | Debian package | origin | licence |", "|---|---|---|---|"]
    rows += [f"| {s['name']} | {s['debian_package']} | {s['origin']} | {s['licence']} |" for s in meta["soundfonts"]]
    excluded = len(meta.get("excluded_instruments", []))
    return "\n".join([
        "## Data", "",
        f"`pgesam-train dataset build --preset default` ({meta['seconds'].get('total', '?')} s): NSynth-format "
        f"notes rendered from Debian's General-MIDI soundfonts with FluidSynth, instrument-disjoint splits. "
        f"{excluded} candidate instruments were excluded by the pitch screen (see dataset.json).", "",
        inp.provenance("dataset.json"),
        meta["summary"].strip(), "", *rows])


def section_codec(inp: ReportInputs, docs: Path) -> str:
    name = f"{inp.codec_eval.name}/results.md"
    md = _read_text(inp.find(inp.codec_eval / "results.md", name))
    head = "## Codec (test instruments)\n\n"
    if md is None:
        return head + _pending("pgesam-train codec eval --checkpoint $PGESAM_HOME/checkpoints/codec/small/stft.pt")
    pngs = sorted(inp.codec_eval.glob("*.png"))[:1]
    figure = _copy_figure(pngs[0] if pngs else None, docs, "codec_spectrogram.png", inp.from_snapshot(name))
    return head + inp.provenance(name) + "\n".join([
        "`pgesam-train codec eval --checkpoint CKPT [--checkpoint CKPT ...] --limit N` (ground truth and the "
        "Griffin-Lim floor are always included; rows are named after the checkpoint files; the exact command of "
        "this table and the other designs compared are in `docs/codec-comparison.md`):", "", md, "",
        figure or ""])


def section_vae(inp: ReportInputs, docs: Path) -> str:
    name = f"{inp.vae_eval.name}/vae_eval.md"
    md = _read_text(inp.find(inp.vae_eval / "vae_eval.md", name))
    head = "## Stage 1: the timbre VAE (Tables 3-5)\n\n"
    if md is None:
        return head + _pending(f"pgesam-train vae eval --preset {inp.preset}")
    maps = [_copy_figure(inp.vae_eval / f"timbre_map_{s}.png", docs, f"timbre_map_{s}.png", inp.from_snapshot(name))
            for s in ("train", "test")]
    from .train_vae import CHECKPOINT_NAME as VAE_NAME
    data = _read_json(inp.find(inp.vae_eval / "vae_eval.json", f"{inp.vae_eval.name}/vae_eval.json", name)) or {}
    command = f"pgesam-train vae eval --preset {inp.preset}" + _checkpoint_option(
        data.get("ours", {}).get("checkpoint"), paths.checkpoints_dir("vae", inp.preset) / VAE_NAME)
    return head + inp.provenance(name) + "\n".join([f"`{command}`:", "", md, "",
                             "Timbre maps (Figure 3 style; training, then test instruments):", "",
                             *[m for m in maps if m]])


def _checkpoint_option(recorded: str | None, default: Path) -> str:
    """The command's `--checkpoint PATH` for a run that evaluated another checkpoint than the default, else ""."""
    if not recorded or Path(recorded).expanduser().resolve() == default.expanduser().resolve():
        return ""
    return f" --checkpoint {recorded}"


def section_ablations(inp: ReportInputs, docs: Path) -> str:
    name = f"{inp.ablations.name}/table6.md"
    md = _read_text(inp.find(inp.ablations / "table6.md", name))
    head = "## Ablations (Table 6, Figure 4)\n\n"
    if md is None:
        return head + _pending(f"pgesam-train vae ablate --preset {inp.preset}")
    fig = _copy_figure(inp.ablations / "ablation.png", docs, "ablation.png", inp.from_snapshot(name))
    table6 = _read_json(inp.find(inp.ablations / "table6.json", f"{inp.ablations.name}/table6.json", name)) or {}
    epochs = ablation_epochs(table6.get("ours", {}))
    command = f"pgesam-train vae ablate --preset {inp.preset}"
    if epochs is not None and epochs != vae_preset(inp.preset).epochs:
        command += f" --epochs {epochs}"
        md = (f"Every run, baseline included, trained {epochs} epochs (the preset: "
              f"{vae_preset(inp.preset).epochs}), so the rows compare like with like.\n\n{md}")
    return head + inp.provenance(name) + "\n".join([f"`{command}`:", "", md, "", fig or ""])


def ablation_epochs(table6: dict) -> int | None:
    """Epochs of the ablation runs: recorded in table6.json ("ours"), or else read from its baseline checkpoint."""
    if "epochs" in table6:
        return int(table6["epochs"])
    baseline = table6.get("checkpoints", {}).get("baseline")
    if not baseline or not Path(baseline).is_file():
        return None
    from .checkpoint import load_checkpoint
    return int(load_checkpoint(Path(baseline), "vae")["config"]["epochs"])


def section_transformer(inp: ReportInputs, docs: Path) -> str:
    name = f"{inp.transformer_eval.name}/transformer_eval.md"
    md = _read_text(inp.find(inp.transformer_eval / "transformer_eval.md", name))
    head = "## Stage 2: the Transformer (Tables 3-4) and the pitch of generated audio\n\n"
    if md is None:
        return head + _pending(f"pgesam-train transformer eval --preset {inp.preset}")
    metrics = _read_json(inp.find(inp.transformer_eval / "transformer_eval.json",
                                  f"{inp.transformer_eval.name}/transformer_eval.json", name)) or {}
    fig = None
    per_pitch = pitch_by_pitch(metrics)
    if per_pitch:
        fig = save_pitch_plot(per_pitch, docs / FIGURES / "pitch_by_pitch.png")
    command = metrics.get("command", f"pgesam-train transformer eval --preset {inp.preset}")
    return head + inp.provenance(name) + "\n".join([f"`{command}`:", "", md, "",
                             f"![pitch accuracy by pitch]({docs.name}/{FIGURES}/{fig.name})" if fig else ""])


def section_torch_bench(inp: ReportInputs) -> str:
    head = "## Generation speed in torch: KV cache against the uncached reference\n\n"
    name = f"{inp.torch_bench.name}/bench.md"
    md = _read_text(inp.find(inp.torch_bench / "bench.md", name))
    command = f"pgesam-train bench --preset {inp.preset} --threads 1 --repeats 9"
    if md is None:
        return head + _pending(command)
    return (head + inp.provenance(name) + f"`{command}` (300-frame notes, one batch of them per row; uncached = "
            "the full forward recomputed at every step, as the paper's reference code generates):\n\n" + md)


def section_bench(inp: ReportInputs) -> str:
    head = "## Engine speed (this kind of machine: 2 CPU cores)\n\n"
    name = f"{inp.engine_bench.parent.name}/{inp.engine_bench.name}"
    report = _read_json(inp.find(inp.engine_bench, name))
    if report is None:
        return head + _pending(f"mkdir -p {inp.engine_bench.parent} && pgesam bench --json > {inp.engine_bench}")
    from pgesam_engine.bench import markdown
    command = report.get("command", "pgesam bench --json")
    return (head + inp.provenance(name) + f"`{command} > {inp.engine_bench}` on the shipped bundle:\n\n"
            + markdown(report))


def section_bundle_pitch(inp: ReportInputs) -> str:
    head = "## The bundle's own notes (onnxruntime, fp16 weight storage, int8 variant)\n\n"
    result = _read_json(inp.find(inp.bundle_pitch, inp.bundle_pitch.name))
    command = (f"pgesam-train export --preset {inp.preset} --weights fp16 --no-static --variant int8 --out B && "
               f"pgesam-train bundle-pitch B --variant int8 --instruments 8 --json {inp.bundle_pitch}")
    if result is None:
        return head + _pending(command)
    from .eval_bundle import markdown
    return head + inp.provenance(inp.bundle_pitch.name) + f"`{command}`:\n\n" + markdown(result)


def section_training() -> str:
    """Where and how long each shipped model trained (from the checkpoints themselves)."""
    from .checkpoint import load_checkpoint
    rows = ["| model | checkpoint | trained to | wall time | where |", "|---|---|---|---|---|"]
    for kind, name, counter in (("codec", "stft.pt", "step"), ("vae", "vae.pt", "epoch"),
                                ("transformer", "transformer.pt", "step")):
        path = paths.checkpoints_dir(kind, "small") / name
        if not path.is_file():
            rows.append(f"| {kind} | (none yet) | | | |")
            continue
        state = load_checkpoint(path, kind)
        seconds = (state.get("extra") or {}).get("seconds")
        wall = f"{seconds / 60:.0f} min" if seconds else "see its CSV log"
        rows.append(f"| {kind} | {path.name} | {counter} {state.get(counter)} | {wall} | CPU, 2 cores shared |")
    return "## Where each model was trained\n\n" + "\n".join(rows)


# ------------------------------------------------------------------------------------- rendered parts
def pitch_by_pitch(metrics: dict) -> dict[str, dict[int, float]]:
    """{notes label: {MIDI pitch: share within 50 cents}} from the per-note audio results of transformer eval."""
    out = {}
    for name, r in (metrics.get("audio") or {}).items():
        notes = r.get("per_note")
        if not notes:
            continue
        by: dict[int, list[bool]] = {}
        for p, c in zip(notes["pitch"], notes["cents"]):
            by.setdefault(int(p), []).append(c is not None and np.isfinite(c) and abs(c) <= 50)
        out[name] = {p: float(np.mean(v)) for p, v in sorted(by.items())}
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def save_pitch_plot(per_pitch: dict[str, dict[int, float]], path: Path) -> Path:
    fig, ax = _pyplot().subplots(figsize=(8, 3.2))
    for name, by in per_pitch.items():
        ax.plot(list(by), list(by.values()), marker="o", label=name.replace("_", " "))
    ax.set_xlabel("requested MIDI pitch")
    ax.set_ylabel("share within 50 cents")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    import soundfile as sf
    path.parent.mkdir(parents=True, exist_ok=True)
    peak = float(np.max(np.abs(audio))) or 1.0
    sf.write(str(path), (audio / max(peak, 1.0)).astype(np.float32), sr, subtype="PCM_16")


def render_examples(docs: Path, preset: str, walk_steps: int = 6) -> str:
    """Example WAVs (generated vs real, and an interpolation walk) and spectrograms -> the section's Markdown."""
    import torch

    from .render import find_codec, render_notes
    from .train_vae import CHECKPOINT_NAME as VAE_NAME
    from .transformer import load_transformer
    from .vae import load_vae
    tf_path = paths.checkpoints_dir("transformer", preset) / "transformer.pt"
    if not tf_path.is_file():
        return "## Examples\n\n" + _pending(f"pgesam-train transformer train --preset {preset}")
    model, extra = load_transformer(tf_path)
    codec = find_codec(extra.get("codec"))
    vae, vae_extra = load_vae(Path(extra.get("vae") or paths.checkpoints_dir("vae", preset) / VAE_NAME))
    from .data.latents import load_latents
    from .evaluate_transformer import centroids
    from .train_transformer import vae_posterior
    lat = load_latents(Path(extra["latents"]), "test")
    mu, _ = vae_posterior(vae.eval(), lat.emb)
    sr, keep = codec.sample_rate, int(EXAMPLE_SECONDS * codec.sample_rate)
    names = sorted(set(lat.instrument_str))
    picks = [names[i] for i in np.linspace(0, len(names) - 1, 3).round().astype(int)]
    lines = ["## Examples", "", "Rendered by `pgesam-train report` with the torch reference render "
             "(`pgesam_train.render.render_notes`) at each test instrument's mean latent point, pitch 60, and the "
             f"same instrument's real note through the codec. Each WAV keeps the first {EXAMPLE_SECONDS:g} s.", "",
             "| instrument | x, y | generated | real (codec round trip) |", "|---|---|---|---|"]
    centre = dict(zip(*centroids(mu, lat.instrument_str)))  # instrument -> mean mu (2,)
    spectra = []
    for name in picks:
        sel = np.array([s == name for s in lat.instrument_str])
        at60 = np.flatnonzero(sel & (lat.pitch == 60))
        idx = at60[0] if len(at60) else np.flatnonzero(sel)[0]
        point = centre[name]
        pitch = int(lat.pitch[idx])
        gen = render_notes(model, codec, float(point[0]), float(point[1]), [pitch])[0][:keep]
        with torch.no_grad():
            real = codec.decode(torch.from_numpy(np.asarray(lat.emb[idx:idx + 1], dtype=np.float32)))[0].numpy()
        real = real[:keep]
        _write_wav(docs / AUDIO / f"{name}-generated.wav", gen, sr)
        _write_wav(docs / AUDIO / f"{name}-real.wav", real, sr)
        spectra.append((name, pitch, gen, real))
        lines.append(f"| {name} (MIDI {pitch}) | {float(point[0]):.2f}, {float(point[1]):.2f} | "
                     f"[wav]({docs.name}/{AUDIO}/{name}-generated.wav) | [wav]({docs.name}/{AUDIO}/{name}-real.wav) |")
    save_spectrograms(spectra, sr, docs / FIGURES / "spectrograms.png")
    a, b = centre[picks[0]], centre[picks[-1]]
    step = int(0.75 * sr)
    walk = [render_notes(model, codec, *map(float, a + (b - a) * t), [60])[0][:step]
            for t in np.linspace(0, 1, walk_steps)]
    _write_wav(docs / AUDIO / "interpolation-walk.wav", np.concatenate(walk), sr)
    lines += ["", f"Interpolation walk, {walk_steps} points from {picks[0]} to {picks[-1]} at MIDI 60, 0.75 s each: "
              f"[interpolation-walk.wav]({docs.name}/{AUDIO}/interpolation-walk.wav)", "",
              f"![spectrograms]({docs.name}/{FIGURES}/spectrograms.png)"]
    return "\n".join(lines)


def save_spectrograms(rows: list[tuple[str, int, np.ndarray, np.ndarray]], sr: int, path: Path) -> Path:
    fig, axes = _pyplot().subplots(len(rows), 2, figsize=(9, 2.2 * len(rows)), squeeze=False)
    for r, (name, pitch, gen, real) in enumerate(rows):
        for c, (label, audio) in enumerate((("generated", gen), ("real, codec round trip", real))):
            ax = axes[r][c]
            ax.specgram(audio, NFFT=1024, Fs=sr, noverlap=768, cmap="magma", vmin=-120)
            ax.set_ylim(0, 8000)
            ax.set_title(f"{name} MIDI {pitch}: {label}", fontsize=8)
            ax.tick_params(labelsize=6)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- the whole
def save_snapshot(inp: ReportInputs) -> list[Path]:
    """Copy every input the report read from a live run into the snapshot folder (atomically, file by file); a
    JSON input that does not parse (the report treated it as missing) is not copied."""
    written = []
    for name, src in inp.used.items():
        if inp.snapshot is None or inp.from_snapshot(name) or not src.is_file():
            continue
        if src.suffix == ".json" and _read_json(src) is None:
            continue
        dst = inp.snapshot / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_text_atomically(dst, src.read_text()))
    return written


def write_report(out: Path, docs: Path, inp: ReportInputs, examples: bool = True, shortfalls: str = "") -> Path:
    """Write REPORT.md at `out` with figures and audio under `docs` (a folder beside it), and refresh the committed
    copies of its inputs in docs/results (`save_snapshot`)."""
    docs.mkdir(parents=True, exist_ok=True)
    if inp.snapshot is None:
        inp.snapshot = docs / RESULTS
    parts = [
        "# pGESAM-RT: the shipped model against the paper", "",
        f"Written by `pgesam-train report` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"{platform.python_version()}). Every table names the command that produced it; the paper's numbers "
        "(Limberg et al. 2025) stand beside ours where the paper has them. Our data are soundfont notes, not "
        "NSynth, and our codec is not EnCodec, so absolute errors are not comparable with the paper's; "
        "accuracies and variance ratios are.",
        "", section_training(), "", section_data(inp), "", section_codec(inp, docs), "", section_vae(inp, docs), "",
        section_ablations(inp, docs), "", section_transformer(inp, docs), "", section_torch_bench(inp), "",
        render_examples(docs, inp.preset) if examples else "", "", section_bundle_pitch(inp), "",
        section_bench(inp)]
    if shortfalls:
        parts += ["", "## Where we fall short of the paper, and why", "", shortfalls.strip()]
    Path(out).write_text("\n".join(parts).replace("\n\n\n", "\n\n") + "\n")
    save_snapshot(inp)
    return Path(out)
