"""`pgesam-train export --check DIR`: every graph of a bundle in onnxruntime against the torch models it came from.

Each graph runs on random inputs and on real ones (embeddings of real notes from the VAE's latent cache, audio
decoded from them, the training instruments' map points) and is compared with the torch computation it replaces:
one `Row` per case with the largest absolute error. Codec graphs are probed at 7, 8, 75, 300 and 301 frames, the
streaming decoder against torch streaming and against the whole-note decode. Finally whole notes are generated
through the graphs alone (transformer_encoder + 300 decoder_step calls + codec_decoder) and compared with the
torch reference render (`pgesam_train.generate.generate`, KV-cached) on the embeddings, to `note_tolerance`.
Quantised variants are reported beside, without a tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pgesam_engine.bundle import stream_tail_output
from pgesam_engine.synth import CacheLayout
from pgesam_train.codec import codec_id
from pgesam_train.data.latents import LatentCacheError, load_latents
from pgesam_train.generate import cache_shape, generate_cached

from . import codec_graphs, decoder_step, transformer_encoder, vae_encoder
from .bundle import Models, load_models
from .manifest import ExportError, read_manifest

CODEC_LENGTHS = (7, 8, 75, 300, 301)
REAL_LENGTHS = (8, 300)  # real embeddings are 300 frames long; two lengths keep the torch side quick
# bundles with float16 weight storage (export/storage.py) are held to errors relative to each output's scale: the
# rounding of every weight to 11 significant bits, through a graph (and through 300 autoregressive steps for a note)
FP16_RELATIVE, FP16_NOTE_RELATIVE = 1e-2, 5e-2


@dataclass(frozen=True)
class Row:
    """One comparison: graph, what was fed, largest |onnx - torch|, largest |torch| (scale), the tolerance
    (None: reported only)."""
    graph: str
    case: str
    max_abs_error: float
    scale: float
    tolerance: float | None

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_abs_error <= self.tolerance


@dataclass
class CheckReport:
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def worst(self, graph: str) -> float:
        """Largest error over every checked case of `graph`."""
        return max(r.max_abs_error for r in self.rows if r.graph == graph)

    def table(self) -> str:
        lines = ["| graph | case | max abs error | max abs value | tolerance | |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| {r.graph} | {r.case} | {r.max_abs_error:.2e} | {r.scale:.3g} | "
                  f"{'-' if r.tolerance is None else f'{r.tolerance:.0e}'} | {'ok' if r.ok else 'FAIL'} |"
                  for r in self.rows]
        return "\n".join(lines)


def _err(onnx_out: np.ndarray, ref: torch.Tensor | np.ndarray) -> tuple[float, float]:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if onnx_out.shape != ref.shape:
        raise ExportError(f"onnx output shape {onnx_out.shape} != torch {ref.shape}")
    return float(np.max(np.abs(onnx_out.astype(np.float64) - ref))), float(np.max(np.abs(ref)))


def open_sessions(root: Path, manifest: dict, threads: int = 1) -> dict[str, ort.InferenceSession]:
    """One CPU session per graph entry of the manifest (variants included), keyed like the manifest."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return {key: ort.InferenceSession(str(Path(root) / g["file"]), so, providers=["CPUExecutionProvider"])
            for key, g in manifest["graphs"].items()}


def reference_models(root: Path, manifest: dict, codec: Path | None = None, vae: Path | None = None,
                     transformer: Path | None = None) -> Models:
    """The torch models a bundle came from: the checkpoints recorded in its manifest unless given; ExportError
    when the codec's weights are not those in the bundle."""
    src = manifest.get("sources", {})
    given = {"codec": codec, "vae": vae, "transformer": transformer}
    found = {k: Path(p) if p else (Path(src[k]["path"]) if (src.get(k) or {}).get("path") else None)
             for k, p in given.items()}
    missing = [k for k in ("vae", "transformer") if found[k] is None or not found[k].is_file()]
    if missing:
        raise ExportError(f"the {' and '.join(missing)} checkpoints this bundle came from are gone "
                          f"({', '.join(str(found[k]) for k in missing)}): pass them with --vae / --transformer")
    if found["codec"] is not None and not found["codec"].is_file():
        raise ExportError(f"the codec checkpoint this bundle came from is gone ({found['codec']}): pass --codec")
    models = load_models(found["codec"], found["vae"], found["transformer"])
    if codec_id(models.codec)["weights_sha256"] != manifest["codec"]["weights"]:
        raise ExportError(f"codec {models.sources['codec'].get('path')} is not the codec in bundle {root}")
    return models


def real_embeddings(models: Models, n: int = 2) -> tuple[torch.Tensor, str]:
    """(n, dim, frames) embeddings of real notes from the VAE's latent cache, or, when it is gone, notes the torch
    Transformer generates at the map's instruments -> (embeddings, where they came from)."""
    for split in ("test", "valid", "train"):
        try:
            lat = load_latents(Path(models.vae_extra.get("latents", "")), split)
        except (LatentCacheError, OSError):
            continue
        if len(lat):
            return torch.from_numpy(np.asarray(lat.emb[:n], dtype=np.float32)), f"latent cache {split}"
    z, midi = real_conditions(models, n)
    return generate_cached(models.transformer, z, midi), "generated notes"


def real_conditions(models: Models, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training instruments' map points (or points on the unit circle) and pitches across the range:
    z (n, 2), MIDI (n,)."""
    insts = models.vae_extra.get("map", {}).get("instruments", [])
    pts = [(i["x"], i["y"]) for i in insts if np.isfinite(i["x"])][:n]
    pts += [(np.cos(k), np.sin(k)) for k in range(n - len(pts))]
    cfg = models.transformer.config
    midi = cfg.pitch_min + torch.linspace(0, cfg.n_pitches - 1, n).round().long()
    return torch.tensor(pts, dtype=torch.float32), midi


def _run(s: ort.InferenceSession, **feeds: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    return s.run(None, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()})


def check_vae_encoder(s: ort.InferenceSession, m: Models, real: torch.Tensor, tol: float) -> list[Row]:
    rows = []
    g = torch.Generator().manual_seed(1)
    rand = torch.randn(3, *real.shape[1:], generator=g) * m.vae.emb_std + m.vae.emb_mean
    for case, emb in (("random B=3", rand), (f"real B={len(real)}", real)):
        outs, refs = _run(s, emb=emb), vae_encoder.torch_reference(m.vae, emb)
        rows.append(Row("vae_encoder", case, *max(map(_err, outs, refs)), tol))
    return rows


def check_transformer_encoder(s: ort.InferenceSession, m: Models, tol: float) -> list[Row]:
    z, midi = real_conditions(m)
    cases = [("random B=3", *transformer_encoder.example_conditions(m.transformer, 3, seed=1)),
             ("map instruments", z, midi - m.transformer.config.pitch_min)]
    rows = []
    for case, zz, pidx in cases:
        outs, refs = _run(s, z=zz, pitch_index=pidx), transformer_encoder.torch_reference(m.transformer, zz, pidx)
        rows.append(Row("transformer_encoder", case, *max(map(_err, outs, refs)), tol))
    return rows


def check_decoder_step(s: ort.InferenceSession, m: Models, static: bool, tol: float) -> list[Row]:
    """Random inputs at several positions and batch sizes; one step of a real note (position 8)."""
    name, rows = decoder_step.STATIC if static else decoder_step.DYNAMIC, []
    frames = m.transformer.config.frames
    names = decoder_step.input_names(m.transformer.config.n_decoder_layers)
    for pos in (0, 1, frames // 2, frames - 1):
        for batch in (1, 3):
            args = decoder_step.example_step_inputs(m.transformer, batch, pos, static, seed=pos + batch)
            outs = _run(s, **dict(zip(names, args)))
            refs = decoder_step.torch_reference(m.transformer, *args, static=static)
            rows.append(Row(name, f"random B={batch} position {pos}", *max(map(_err, outs, refs)), tol))
    return rows + [_real_step(s, m, static, tol)]


def _real_step(s: ort.InferenceSession, m: Models, static: bool, tol: float, at: int = 8) -> Row:
    """Step `at` of real notes (map instruments), its inputs made by `at` torch steps from <BOS>."""
    cfg = m.transformer.config
    z, midi = real_conditions(m)
    _, *cross = transformer_encoder.torch_reference(m.transformer, z, midi - cfg.pitch_min)
    kv = [torch.zeros(cache_shape(cfg, len(z), cfg.frames if static else 0)) for _ in cross]
    frame = torch.zeros(len(z), cfg.dim)
    for t in range(at):
        position = torch.tensor([t] if static else t)
        frame, *kv = decoder_step.torch_reference(m.transformer, frame, position, *cross, *kv, static=static)
    args = (frame, torch.tensor([at] if static else at), *cross, *kv)
    ref = decoder_step.torch_reference(m.transformer, *args, static=static)
    outs = _run(s, **dict(zip(decoder_step.input_names(cfg.n_decoder_layers), args)))
    name = decoder_step.STATIC if static else decoder_step.DYNAMIC
    return Row(name, f"real note B={len(z)} position {at}", *max(map(_err, outs, ref)), tol)


def check_variants(sessions: dict, m: Models) -> list[Row]:
    """One call of every quantised graph vs torch on random inputs (reported, no tolerance)."""
    rows = []
    for key, s in sessions.items():
        graph = key.split(".")[0]
        if "." not in key:
            continue
        if graph == transformer_encoder.NAME:
            args = transformer_encoder.example_conditions(m.transformer, 3, seed=2)
            outs, refs = _run(s, z=args[0], pitch_index=args[1]), transformer_encoder.torch_reference(m.transformer,
                                                                                                      *args)
        else:
            static = graph == decoder_step.STATIC
            args = decoder_step.example_step_inputs(m.transformer, 3, 150, static, seed=2)
            outs = _run(s, **dict(zip(decoder_step.input_names(m.transformer.config.n_decoder_layers), args)))
            refs = decoder_step.torch_reference(m.transformer, *args, static=static)
        rows.append(Row(key, "random B=3 vs torch", *max(map(_err, outs, refs)), None))
    return rows


def check_codec(sessions: dict, m: Models, real: torch.Tensor, tol: float) -> list[Row]:
    """codec_decoder / codec_encoder at every length of CODEC_LENGTHS (random and real), and the stream."""
    codec, rows = m.codec, []
    lengths = sorted({max(t, codec_graphs.min_first_frames(codec)) for t in CODEC_LENGTHS})
    with torch.no_grad():  # decoded real notes over a noise floor 30 dB below their peak (see example_audio)
        real_audio = codec.decode(real)
        floor = 0.03 * real_audio.abs().amax(dim=1, keepdim=True)
        real_audio = real_audio + floor * torch.randn(real_audio.shape, generator=torch.Generator().manual_seed(0))
    for t in lengths:
        cases = [("random", codec_graphs.example_frames(codec, 2, t, seed=t))]
        cases += [("real", real[:, :, :t])] if t in REAL_LENGTHS else []
        for case, emb in cases:
            with torch.no_grad():
                ref = codec.decode(emb)
            rows.append(Row("codec_decoder", f"{case} T={t}", *_err(_run(sessions["codec_decoder"], emb=emb)[0], ref),
                            tol))
        if "codec_encoder" in sessions:
            audios = [("random", codec_graphs.example_audio(codec, 2, t * codec.hop - 7, seed=t))]
            audios += [("real", real_audio[:, :t * codec.hop])] if t in REAL_LENGTHS else []
            for case, audio in audios:
                with torch.no_grad():
                    ref = codec.encode(audio)
                rows.append(Row("codec_encoder", f"{case} {audio.shape[1]} samples",
                                *_err(_run(sessions["codec_encoder"], audio=audio)[0], ref), tol))
    if "codec_decoder_stream" in sessions:
        rows += check_stream(sessions, m, real, tol)
    return rows


def stream_chunks(codec, total: int) -> list[int]:
    """Uneven chunk sizes summing to `total`: the codec's minimum first chunk, then 1, 3, 8, 2, 16, ... frames."""
    sizes, left = [codec_graphs.min_first_frames(codec)], total - codec_graphs.min_first_frames(codec)
    pattern = (1, 3, 8, 2, 16)
    while left > 0:
        sizes.append(min(pattern[len(sizes) % len(pattern)], left))
        left -= sizes[-1]
    return sizes


def onnx_decode_stream(s: ort.InferenceSession, manifest_state: list[dict], frames: np.ndarray,
                       chunks: list[int], tail: str | None = None) -> np.ndarray:
    """Streamed decode through codec_decoder_stream: frames (B, dim, T) in chunks -> audio (B, T * hop), then,
    when `tail` names the output holding the rest of the note (the stream manifest's tail, `out_<state>` or the
    extra output), that rest too."""
    state = {f"in_{st['name']}": np.zeros((frames.shape[0], *st["shape"][1:]), np.float32) for st in manifest_state}
    names = [o.name for o in s.get_outputs()]
    out, pos, result = [], 0, {}
    for n in chunks:
        result = dict(zip(names, s.run(None, {"frames": frames[:, :, pos:pos + n], **state})))
        state = {k: result["out_" + k[3:]] for k in state}
        out.append(result["audio"])
        pos += n
    return np.concatenate(out + ([result[tail]] if tail else []), axis=1)



def check_stream(sessions: dict, m: Models, real: torch.Tensor, tol: float) -> list[Row]:
    codec, rows = m.codec, []
    stream = codec_graphs.stream_manifest(codec)
    spec, tail, lat = stream["state"], stream_tail_output(stream), codec.stream_latency
    for case, emb in (("random", codec_graphs.example_frames(codec, 2, 75, seed=3)), ("real", real[:, :, :75])):
        chunks = stream_chunks(codec, emb.shape[2])
        whole = onnx_decode_stream(sessions["codec_decoder_stream"], spec, emb.numpy(), chunks, tail)
        streamed = whole[:, :emb.shape[2] * codec.hop]  # without the tail
        rows.append(Row("codec_decoder_stream", f"{case} vs torch stream, chunks {chunks[:5]}...",
                        *_err(streamed, codec_graphs.torch_decode_stream(codec, emb, chunks)), tol))
        full = _run(sessions["codec_decoder"], emb=emb)[0]
        rows.append(Row("codec_decoder_stream", f"{case} vs whole decode (latency {lat} samples)",
                        *_err(streamed[:, lat:], full[:, :full.shape[1] - lat]), tol))
        if tail and lat:
            rows.append(Row("codec_decoder_stream", f"{case} with its tail ({tail}) vs whole decode",
                            *_err(whole[:, lat:], full), tol))
    return rows


def onnx_generate(sessions: dict, kv_cache: dict, z: np.ndarray, pitch_index: np.ndarray, frames: int,
                  static: bool = False, step: str | None = None) -> np.ndarray:
    """A whole note through the graphs alone: z (B, 2), pitch_index (B,) -> frames (B, dim, frames), the cache
    tensors named as the manifest's `kv_cache` says.

    `step` names the step graph's manifest key (default decoder_step or decoder_step_static)."""
    layout = CacheLayout.read(kv_cache)
    cross = sessions["transformer_encoder"].run(list(layout.cross), {"z": z, "pitch_index": pitch_index})
    sess = sessions[step or (decoder_step.STATIC if static else decoder_step.DYNAMIC)]
    kv = layout.zeros(layout.self_in, len(z), frames if static else 0)
    feeds = dict(zip(layout.cross, cross))
    frame = np.zeros((len(z), sess.get_inputs()[0].shape[1]), np.float32)  # <BOS>
    out = []
    for t in range(frames):
        position = np.array([t] if static else t, np.int64)
        frame, *new = sess.run(["next_frame", *layout.self_out], {"frame": frame, "position": position, **feeds, **kv})
        kv = dict(zip(layout.self_in, new))
        out.append(frame)
    return np.stack(out, axis=2)


def check_notes(sessions: dict, kv_cache: dict, m: Models, note_tol: float, tol: float) -> list[Row]:
    """Whole notes (map instruments): ONNX vs the torch reference render; static vs dynamic step; audio."""
    z, midi = real_conditions(m)
    pidx = (midi - m.transformer.config.pitch_min).numpy()
    n = m.transformer.config.frames
    ref = generate_cached(m.transformer, z, midi)  # the reference render's frames (B, dim, frames)
    frames = onnx_generate(sessions, kv_cache, z.numpy(), pidx, n)
    rows = [Row("note", f"{n} frames B={len(z)}: onnx vs torch render (embeddings)", *_err(frames, ref), note_tol)]
    if decoder_step.STATIC in sessions:
        static = onnx_generate(sessions, kv_cache, z.numpy(), pidx, n, static=True)
        rows.append(Row("note", "decoder_step_static vs decoder_step (embeddings)", *_err(static, frames), tol))
    with torch.no_grad():
        audio_ref = m.codec.decode(ref)
    audio = sessions["codec_decoder"].run(None, {"emb": frames})[0]
    rows.append(Row("note", "audio: onnx frames + codec_decoder vs torch render", *_err(audio, audio_ref), None))
    for key in sessions:
        if "." in key and key.split(".")[0] in (decoder_step.DYNAMIC, decoder_step.STATIC):
            var = onnx_generate(sessions, kv_cache, z.numpy(), pidx, n, static=key.startswith(decoder_step.STATIC),
                                step=key)
            rows.append(Row("note", f"variant {key} vs torch render (embeddings)", *_err(var, ref), None))
    return rows


def fp16_tolerance(row: Row) -> Row:
    """The row held to a tolerance relative to its output's scale (float16 weight storage).

    Random-input rows of the codec decoders are reported only: the phase-advance head integrates the rounding's
    tiny changes of each bin's advance over every frame, so the waveform of a long random input drifts in phase
    (measured: 0.16 at 300 frames) while its magnitudes, and real notes (measured: 0.4 %), stay put."""
    if row.tolerance is None or (row.graph.startswith("codec_decoder") and row.case.startswith("random")):
        return replace(row, tolerance=None)
    rel = FP16_NOTE_RELATIVE if row.graph == "note" else FP16_RELATIVE
    return replace(row, tolerance=rel * max(1.0, row.scale))


def check_bundle(root: Path, codec: Path | None = None, vae: Path | None = None, transformer: Path | None = None,
                 tolerance: float = 1e-4, note_tolerance: float = 1e-3,
                 log: Callable[[str], None] = lambda _: None) -> CheckReport:
    """Compare every graph of the bundle at `root` with torch; see the module docstring. Returns the report
    (`report.ok` says whether every row is within its tolerance)."""
    root = Path(root)
    manifest = read_manifest(root)
    m = reference_models(root, manifest, codec, vae, transformer)
    sessions = open_sessions(root, manifest)
    real, where = real_embeddings(m)
    log(f"real inputs: {where}")
    report = CheckReport()
    steps = [lambda: check_transformer_encoder(sessions["transformer_encoder"], m, tolerance),
             lambda: check_decoder_step(sessions["decoder_step"], m, False, tolerance),
             lambda: check_codec(sessions, m, real, tolerance),
             lambda: check_notes(sessions, manifest["kv_cache"], m, note_tolerance, tolerance)]
    if "decoder_step_static" in sessions:
        steps.insert(2, lambda: check_decoder_step(sessions["decoder_step_static"], m, True, tolerance))
    if any("." in key for key in sessions):
        steps.append(lambda: check_variants(sessions, m))
    if "vae_encoder" in sessions:
        steps.insert(0, lambda: check_vae_encoder(sessions["vae_encoder"], m, real, tolerance))
    fp16 = manifest.get("weights") == "fp16"
    if fp16:
        log(f"float16 weight storage: tolerances relative to each output's scale ({FP16_RELATIVE:g} per graph, "
            f"{FP16_NOTE_RELATIVE:g} per whole note)")
    for run in steps:
        rows = [fp16_tolerance(r) for r in run()] if fp16 else run()
        report.rows += rows
        for r in rows:
            log(f"{r.graph:22s} {r.case:60s} {r.max_abs_error:.2e} {'ok' if r.ok else 'FAIL'}")
    return report
