"""Codec evaluation on held-out notes, side by side with the ground truth and the Griffin-Lim floor, and the
ONNX Runtime decode-speed benchmark.

    pgesam-train codec eval --checkpoint CKPT [--checkpoint CKPT2 ...] --dataset DIR --split test [--limit N]

Metrics per codec (mean over notes, whole 4 s notes at 24 kHz):
    mel_l1      L1 between natural-log mel spectrograms (n_fft 1024, hop 256, 128 bands, floor 1e-5); lower is better
    mrstft      multi-resolution STFT distance (spectral convergence + log-magnitude L1, FFT 512/1024/2048)
    si_sdr      scale-invariant SDR in dB (phase-sensitive; higher is better)
    pitch_ok    share of notes whose original is voiced (torchcrepe) whose reconstruction is within 50 cents of the
                labelled pitch
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from tqdm import tqdm

from .codec import Codec, build_codec, resample
from .codecs.modules import mel_filterbank
from .config import CodecConfig
from .data.nsynth import Note, load_audio, load_split
from .pitch import PitchEstimate, estimate_pitch
from .reports import write_json_markdown
from .train_codec import DATASET_SR, SpectralLoss

METRICS = ("mel_l1", "mrstft", "si_sdr", "pitch_ok")
GROUND_TRUTH, FLOOR = "ground_truth", "griffinlim_floor"


def log_mel(x: Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 128) -> Tensor:
    """x (B, S) -> natural-log mel magnitude (B, n_mels, frames) of the evaluation metric."""
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    return torch.log(torch.clamp(mel_filterbank(sample_rate, n_fft, n_mels) @ spec, min=1e-5))


def si_sdr(y: Tensor, x: Tensor) -> Tensor:
    """Scale-invariant SDR (dB) of estimate y against reference x, both (B, S) -> (B,)."""
    alpha = (y * x).sum(-1, keepdim=True) / ((x * x).sum(-1, keepdim=True) + 1e-9)
    target = alpha * x
    return 10 * torch.log10((target ** 2).sum(-1) / (((y - target) ** 2).sum(-1) + 1e-9) + 1e-9)


def spectral_metrics(y: Tensor, x: Tensor, sample_rate: int, loss_fn: SpectralLoss) -> dict[str, list[float]]:
    """Per-note mel_l1, mrstft and si_sdr of reconstructions y against originals x, both (B, S)."""
    out: dict[str, list[float]] = {"mel_l1": [], "mrstft": [], "si_sdr": si_sdr(y, x).tolist()}
    for i in range(len(x)):
        out["mel_l1"].append(float((log_mel(y[i:i + 1], sample_rate) - log_mel(x[i:i + 1], sample_rate)).abs().mean()))
        out["mrstft"].append(float(loss_fn(y[i:i + 1], x[i:i + 1])["stft"]))
    return out


def pick_notes(notes: list[Note], limit: int | None) -> list[Note]:
    """`limit` notes spread evenly over the sorted split (all instruments and pitches represented), or all."""
    if not limit or limit >= len(notes):
        return notes
    return [notes[i] for i in np.unique(np.linspace(0, len(notes) - 1, limit).round().astype(int))]


def _reconstruct(codec: Codec | None, x: Tensor) -> Tensor:
    if codec is None:
        return x
    with torch.inference_mode():
        y = codec.decode(codec.encode(x, sample_rate=codec.sample_rate))
    return y[:, : x.shape[1]]


def evaluate_codecs(codecs: dict[str, Codec], dataset_dir: Path, out_dir: Path, split: str = "test",
                    limit: int | None = None, batch_size: int = 8, n_examples: int = 3, pitch_model: str = "tiny",
                    progress: bool = True) -> dict:
    """Evaluate each codec (plus the ground truth and the Griffin-Lim floor) on one split; write results.json,
    results.md, spectrogram PNGs and example WAVs to `out_dir`. Returns the results dict."""
    notes = pick_notes(load_split(dataset_dir, split), limit)
    if not notes:
        raise ValueError(f"split {split!r} of {dataset_dir} has no notes")
    sr = next(iter(codecs.values())).sample_rate if codecs else 24000
    rows: dict[str, Codec | None] = {GROUND_TRUTH: None, **codecs,
                                     FLOOR: build_codec(CodecConfig(backend="griffinlim", sample_rate=sr))}
    per_note = {name: {m: [] for m in ("mel_l1", "mrstft", "si_sdr")} for name in rows}
    pitches: dict[str, list[PitchEstimate]] = {name: [] for name in rows}
    seconds = {name: 0.0 for name in rows}
    examples: dict[str, list[np.ndarray]] = {name: [] for name in rows}
    loss_fn = SpectralLoss(sr)
    bar = tqdm(total=len(notes) * len(rows), disable=not progress, desc=f"codec eval ({split})", unit="note")
    for b in range(0, len(notes), batch_size):
        batch = notes[b:b + batch_size]
        x = torch.from_numpy(np.stack([resample(load_audio(n, DATASET_SR), DATASET_SR, sr) for n in batch]))
        for name, codec in rows.items():
            t = time.monotonic()
            y = _reconstruct(codec, x)
            seconds[name] += time.monotonic() - t
            for k, v in spectral_metrics(y, x, sr, loss_fn).items():
                per_note[name][k].extend(v)
            pitches[name].extend(estimate_pitch(a, sr, model=pitch_model) for a in y.numpy())
            examples[name].extend(list(y.numpy()[: max(0, n_examples - len(examples[name]))]))
            bar.update(len(batch))
    bar.close()
    results = _summarise(notes, per_note, pitches, seconds, split, str(dataset_dir))
    write_report(results, examples, notes[:n_examples], sr, Path(out_dir))
    return results


def _summarise(notes: list[Note], per_note: dict, pitches: dict, seconds: dict, split: str, dataset: str) -> dict:
    labels = [n.pitch for n in notes]
    voiced = [not np.isnan(p.midi) for p in pitches[GROUND_TRUTH]]
    summary = {}
    for name in per_note:
        ok = [p.within(t) for p, t, v in zip(pitches[name], labels, voiced) if v]
        summary[name] = {**{k: float(np.mean(v)) for k, v in per_note[name].items()},
                         "pitch_ok": float(np.mean(ok)) if ok else float("nan"),
                         "codec_seconds_per_note": seconds[name] / len(notes)}
    return {"split": split, "dataset": dataset, "notes": len(notes), "voiced_notes": int(sum(voiced)),
            "rows": summary, "per_note": {"note_str": [n.note_str for n in notes], "pitch": labels,
                                          **{name: {**per_note[name], "midi": [p.midi for p in pitches[name]]}
                                             for name in per_note}}}


def markdown_table(results: dict) -> str:
    """The summary as a Markdown table (one row per codec)."""
    lines = [f"Codec evaluation on {results['notes']} `{results['split']}` notes ({results['voiced_notes']} voiced "
             "in the original).", "",
             "| codec | mel L1 ↓ | MR-STFT ↓ | SI-SDR (dB) ↑ | pitch within 50 c ↑ | codec s/note |",
             "|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {r['mel_l1']:.3f} | {r['mrstft']:.3f} | {r['si_sdr']:.1f} | "
                     f"{100 * r['pitch_ok']:.1f} % | {r['codec_seconds_per_note']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, examples: dict[str, list[np.ndarray]], notes: list[Note], sample_rate: int,
                 out_dir: Path) -> None:
    """results.json, results.md, one spectrogram PNG and one WAV per codec for each example note."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    write_json_markdown(out_dir, "results", results, markdown_table(results))
    for i, note in enumerate(notes):
        fig, axes = plt.subplots(len(examples), 1, figsize=(8, 2.2 * len(examples)), sharex=True, squeeze=False)
        for ax, (name, audio) in zip(axes[:, 0], examples.items()):
            sf.write(out_dir / f"{note.note_str}--{name}.wav", audio[i], sample_rate, subtype="PCM_16")
            ax.imshow(log_mel(torch.from_numpy(audio[i])[None], sample_rate)[0].numpy(), origin="lower",
                      aspect="auto", vmin=-11.5, vmax=3)
            ax.set_ylabel(name, fontsize=7)
        axes[0, 0].set_title(f"{note.note_str}: log-mel (128 bands, hop 256)")
        fig.tight_layout()
        fig.savefig(out_dir / f"{note.note_str}.png", dpi=80)
        plt.close(fig)


def export_codec_onnx(codec: Codec, out_dir: Path, opset: int = 17) -> dict[str, Path]:
    """Export the codec's three graphs (legacy exporter, dynamic batch and length) for tests and benchmarks.

    Names: codec_encoder (wav -> emb), codec_decoder (emb -> wav), codec_decoder_stream (frames, in_<state>...
    -> audio, out_<state>..., then the codec's tail output if it has one). The shipped bundle is written by
    `export/`, not here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mods = {k: m.eval() for k, m in codec.export_modules().items()}
    spec = codec.stream_state_spec()
    state_in, state_out = [f"in_{n}" for n, _ in spec], [f"out_{n}" for n, _ in spec]
    state_out += [codec.stream_tail_output] if codec.stream_tail_output else []
    frames = torch.randn(1, codec.dim, 8)
    jobs = {
        "codec_encoder": ((torch.randn(1, 8 * codec.hop),), ["wav"], ["emb"],
                          {"wav": {0: "batch", 1: "samples"}, "emb": {0: "batch", 2: "frames"}}),
        "codec_decoder": ((frames,), ["emb"], ["wav"],
                          {"emb": {0: "batch", 2: "frames"}, "wav": {0: "batch", 1: "samples"}}),
        "codec_decoder_stream": ((frames, *codec.initial_stream_state(1)), ["frames", *state_in], ["audio", *state_out],
                                 {"frames": {0: "batch", 2: "frames"}, "audio": {0: "batch", 1: "samples"},
                                  **{n: {0: "batch"} for n in state_in + state_out}}),
    }
    paths = {}
    for name, (args, inputs, outputs, axes) in jobs.items():
        paths[name] = out_dir / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(mods[name], args, str(paths[name]), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    return paths


def bench_decode(codec: Codec, frames: int = 300, batch: int = 1, chunk: int = 8, repeats: int = 20,
                 threads: int = 2) -> dict:
    """ONNX Runtime decode speed: median seconds for `frames` frames at `batch` (full graph) and per `chunk`-frame
    streaming step, and the realtime factor (audio seconds per decode second, batch 1 audio counted once per note)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_codec_onnx(codec, Path(tmp))
        full = ort.InferenceSession(str(paths["codec_decoder"]), opts, providers=["CPUExecutionProvider"])
        stream = ort.InferenceSession(str(paths["codec_decoder_stream"]), opts, providers=["CPUExecutionProvider"])
    emb = np.random.default_rng(0).standard_normal((batch, codec.dim, frames)).astype(np.float32)
    state = {f"in_{n}": s.numpy() for (n, _), s in zip(codec.stream_state_spec(), codec.initial_stream_state(1))}
    feeds = {"frames": emb[:1, :, :chunk], **state}
    t_full = _median_time(lambda: full.run(None, {"emb": emb}), repeats)
    t_chunk = _median_time(lambda: stream.run(None, feeds), repeats)
    audio_s = batch * frames * codec.hop / codec.sample_rate
    return {"frames": frames, "batch": batch, "full_decode_s": t_full, "realtime_factor": audio_s / t_full,
            "chunk_frames": chunk, "chunk_decode_s": t_chunk,
            "chunk_realtime_factor": chunk * codec.hop / codec.sample_rate / t_chunk, "threads": threads}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
