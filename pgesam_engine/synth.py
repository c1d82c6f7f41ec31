"""Synthesis with onnxruntime: timbre point + MIDI pitch -> codec frames -> audio, and audio -> timbre point.

Per note batch: `transformer_encoder` once (cross-attention K/V reused by every step), then one `decoder_step` per
frame with the self-attention cache kept as OrtValues bound with IOBinding, so the cache never goes through numpy.
On CUDA the static-shape step (`decoder_step_static`) runs on fixed device buffers (two bindings used in turn, so
input and output caches never alias), optionally captured as CUDA graphs. Audio comes from `codec_decoder` (whole
notes) or `codec_decoder_stream` (a few frames at a time, state passed in and out explicitly).
Only names and shapes from docs/bundle.md are used; nothing depends on what the graphs compute. The cache tensors'
names and axes come from the manifest's `kv_cache` (`CacheLayout`).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError, Manifest

log = logging.getLogger("pgesam.synth")
STEP_MODES = ("auto", "dynamic", "static")
# frames per chunk a whole-note render decodes while generating (2/3 s). Each chunk re-decodes the frames of history
# the codec's phase refinement needs: a note in 25-frame chunks cost 2.3x a whole decode, in 50-frame chunks 1.5x
PIPELINE_CHUNK = 50
_graph_ids = itertools.count(1)


class SynthError(ValueError):
    """A request the model cannot serve (pitch out of range, bad audio); the message says why."""


def _type_of(session: ort.InferenceSession, name: str) -> type:
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(double)": np.float64, "tensor(int32)": np.int32}
    for i in session.get_inputs():
        if i.name == name:
            return kinds.get(i.type, np.float32)
    raise BundleError(f"graph has no input {name!r}; the bundle does not follow docs/bundle.md")


@dataclass(frozen=True)
class CacheLayout:
    """The attention cache as the manifest's `kv_cache` describes it (docs/bundle.md): the cross-attention tensors
    transformer_encoder returns and the decoder steps take (`cross`), each self-attention cache input (`self_in`)
    with the step output that replaces it (`self_out`), and the axes every one of these tensors is laid out along."""
    axes: tuple[str, ...]
    sizes: dict[str, int]  # heads, head_dim, encoder_length, max_length
    cross: tuple[str, ...]
    self_in: tuple[str, ...]
    self_out: tuple[str, ...]

    @classmethod
    def read(cls, kv: dict, where: str = "manifest.json") -> CacheLayout:
        """From the manifest's kv_cache dict; BundleError when it does not describe per-tensor caches."""
        missing = [k for k in ("layout", "cross", "self", "heads", "head_dim", "encoder_length", "max_length")
                   if k not in kv]
        axes = tuple(kv.get("layout", ()))
        if missing or isinstance(kv["layout"], str) or {"batch", "length"} - set(axes):
            raise BundleError(f"{where}: kv_cache does not name its cache tensors and axes (missing "
                              f"{', '.join(missing) or 'layout axes'}); re-export the bundle with `pgesam-train "
                              "export`")
        sizes = {k: int(kv[k]) for k in ("heads", "head_dim", "encoder_length", "max_length")}
        return cls(axes, sizes, tuple(kv["cross"]), tuple(i for i, _ in kv["self"]), tuple(o for _, o in kv["self"]))

    def shape(self, batch: int, length: int) -> tuple[int, ...]:
        """Shape of one cache tensor holding `length` positions for `batch` notes."""
        dims = {**self.sizes, "batch": batch, "length": length}
        return tuple(dims[axis] for axis in self.axes)

    def zeros(self, names: Sequence[str], batch: int, length: int, rng: np.random.Generator | None = None
              ) -> dict[str, np.ndarray]:
        """name -> a float32 cache tensor of `length` positions: zeros, or standard normal with `rng`."""
        shape = self.shape(batch, length)
        return {n: (np.zeros(shape, np.float32) if rng is None else rng.standard_normal(shape).astype(np.float32))
                for n in names}


def cache_layout(manifest: Manifest) -> CacheLayout:
    return CacheLayout.read(manifest.raw.get("kv_cache", {}))


class DynamicStepper:
    """decoder_step with a growing cache: step p binds the out_self_* of step p-1 as its in_self_*, so the cache
    stays in OrtValues on the device and never passes through numpy.

    cross: the cross-attention OrtValues by name (transformer_encoder's outputs).
    """

    def __init__(self, session: ort.InferenceSession, cross: dict[str, ort.OrtValue], batch: int, dim: int,
                 layout: CacheLayout, device: str):
        self.session, self.device, self.layout = session, device, layout
        self.io = session.io_binding()
        for name, value in cross.items():
            self.io.bind_ortvalue_input(name, value)
        self.frame = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, dim), np.float32), device)  # <BOS>
        self.cache = [ort.OrtValue.ortvalue_from_numpy(a, device)
                      for a in layout.zeros(layout.self_in, batch, 0).values()]  # P = 0
        self.positions: dict[int, ort.OrtValue] = {}

    def step(self, position: int) -> np.ndarray:
        """Run step `position` (= frames already generated) -> next frame (B, dim) float32 on the host."""
        pos = self.positions.get(position)
        if pos is None:
            pos = self.positions[position] = ort.OrtValue.ortvalue_from_numpy(np.array(position, np.int64))
        self.io.bind_ortvalue_input("frame", self.frame)
        self.io.bind_ortvalue_input("position", pos)
        for name, value in zip(self.layout.self_in, self.cache):
            self.io.bind_ortvalue_input(name, value)
        self.io.bind_output("next_frame", self.device)
        for name in self.layout.self_out:
            self.io.bind_output(name, self.device)
        self.session.run_with_iobinding(self.io)
        self.frame, *self.cache = self.io.get_outputs()  # in binding order
        return self.frame.numpy()


class StaticStepper:
    """decoder_step_static on fixed buffers: frame and cache ping-pong between two bindings (A->B, B->A), so with
    CUDA graphs each binding is captured once (its own `gpu_graph_id`) and replayed with only `position` updated.

    graphs: "capture" (own graph ids), "off" (this stepper's runs bypass capture on a graph-enabled session:
    gpu_graph_id -1, so a replay never uses another stepper's buffers), or "none" (session without CUDA graphs).
    """

    def __init__(self, session: ort.InferenceSession, batch: int, dim: int, layout: CacheLayout, device: str,
                 graphs: str = "none"):
        self.session, self.lock, self.device, self.layout = session, threading.Lock(), device, layout

        def buf(shape: tuple, dtype: type = np.float32) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device)
        self.position = buf((1,), np.int64)
        self.frames = (buf((batch, dim)), buf((batch, dim)))
        shape = layout.shape(batch, layout.sizes["max_length"])
        kv = [[buf(shape) for _ in layout.self_in] for _ in (0, 1)]
        self.cross: dict[str, ort.OrtValue] = {}
        self.bindings = []
        self.run_options = []
        for parity in (0, 1):
            io = session.io_binding()
            io.bind_ortvalue_input("frame", self.frames[parity])
            io.bind_ortvalue_input("position", self.position)
            io.bind_ortvalue_output("next_frame", self.frames[1 - parity])
            for name_in, name_out, a, b in zip(layout.self_in, layout.self_out, kv[parity], kv[1 - parity]):
                io.bind_ortvalue_input(name_in, a)
                io.bind_ortvalue_output(name_out, b)
            self.bindings.append(io)
            ro = ort.RunOptions()
            if graphs != "none":
                ro.add_run_config_entry("gpu_graph_id", str(next(_graph_ids)) if graphs == "capture" else "-1")
            self.run_options.append(ro)
        self._zero_frame = np.zeros((batch, dim), np.float32)

    def reset(self, cross: dict[str, ort.OrtValue]) -> None:
        """Start a new note batch: <BOS> frame, new cross K/V copied into the fixed buffers (device to device)."""
        for name, value in cross.items():
            if name not in self.cross:
                self.cross[name] = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), np.float32, self.device)
                for io in self.bindings:
                    io.bind_ortvalue_input(name, self.cross[name])
            self.cross[name].update_inplace(value)
        self.frames[0].update_inplace(self._zero_frame)

    def step(self, position: int) -> np.ndarray:
        parity = position % 2
        self.position.update_inplace(np.array([position], np.int64))
        self.session.run_with_iobinding(self.bindings[parity], self.run_options[parity])
        return self.frames[1 - parity].numpy()


class StreamDecoder:
    """codec_decoder_stream for a batch: push frames (B, dim, t) -> audio (B, t*hop), state carried explicitly.

    The first `latency_samples` of output (the codec's lookahead) are dropped so that streamed audio lines up
    with the whole-note decode; `rest()` is the rest of it after the last push, from the output named `tail`.
    """

    def __init__(self, session: ort.InferenceSession, state: Sequence[tuple[str, tuple[int, ...]]], batch: int,
                 latency_samples: int = 0, tail: str | None = None):
        self.session = session
        self.state = {f"in_{name}": np.zeros((batch, *shape[1:]), _type_of(session, f"in_{name}"))
                      for name, shape in state}
        self.skip = latency_samples
        self.tail = tail if latency_samples else None  # no lag, nothing left after the last frame
        self.outputs: dict[str, np.ndarray] = {}

    def rest(self) -> np.ndarray | None:
        """(B, latency_samples): the whole-note decode's last samples after the last push, or None without a tail."""
        return None if self.tail is None else self.outputs[self.tail].astype(np.float32)

    def push(self, frames: np.ndarray) -> np.ndarray:
        outs = self.session.run(None, {"frames": np.ascontiguousarray(frames, np.float32), **self.state})
        names = [o.name for o in self.session.get_outputs()]
        result = self.outputs = dict(zip(names, outs))
        for key in self.state:
            self.state[key] = result["out_" + key[3:]]
        audio = result["audio"]
        if self.skip:
            cut = min(self.skip, audio.shape[1])
            self.skip -= cut
            audio = audio[:, cut:]
        return audio


@dataclass(frozen=True)
class Encoded:
    """Where an audio file lands on the map: point, predicted MIDI pitch, nearest training instruments."""
    x: float
    y: float
    pitch: int
    nearest: list[tuple[dict, float]]


class Synth:
    """Generation, decoding and encoding over an open `Bundle`. Thread-safe: sessions may run concurrently."""

    def __init__(self, bundle: Bundle, step_mode: str = "auto", stream_chunk: int = 8):
        if step_mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {STEP_MODES}, got {step_mode!r}")
        self.bundle, self.m = bundle, bundle.manifest
        self.layout = cache_layout(self.m)
        self.device = bundle.device
        if step_mode == "auto":
            step_mode = "static" if self.device == "cuda" and bundle.has("decoder_step_static") else "dynamic"
        if step_mode == "static":
            bundle.session("decoder_step_static")
        self.step_mode, self.stream_chunk = step_mode, stream_chunk
        self._static: dict[int, StaticStepper] = {}
        self._static_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- conditioning
    def conditions(self, points: np.ndarray, pitches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """points (B, 2), MIDI pitches (B,) -> z (B, 2) float32, pitch_index (B,) int64; SynthError if off range."""
        z = np.ascontiguousarray(np.atleast_2d(points), np.float32)
        p = np.atleast_1d(np.asarray(pitches)).astype(np.int64)
        if z.shape[1:] != (2,) or len(z) != len(p):
            raise SynthError(f"need one (x, y) per pitch, got points {z.shape} and pitches {p.shape}")
        bad = p[(p < self.m.pitch_min) | (p > self.m.pitch_max)]
        if len(bad):
            raise SynthError(f"MIDI pitch {int(bad[0])} is outside this model's range "
                             f"{self.m.pitch_min}-{self.m.pitch_max}")
        return z, p - self.m.pitch_min

    def _cross_kv(self, z: np.ndarray, pitch_index: np.ndarray) -> dict[str, ort.OrtValue]:
        """transformer_encoder on the device -> the cross-attention OrtValues by name."""
        sess = self.bundle.session("transformer_encoder")
        io = sess.io_binding()
        io.bind_cpu_input("z", z)
        io.bind_cpu_input("pitch_index", pitch_index)
        for name in ("memory", *self.layout.cross):
            io.bind_output(name, self.device)
        sess.run_with_iobinding(io)
        return dict(zip(self.layout.cross, io.get_outputs()[1:]))

    def _stepper(self, cross: dict[str, ort.OrtValue], batch: int) -> tuple[DynamicStepper | StaticStepper, Callable]:
        """A stepper for this batch and the function that releases it."""
        if self.step_mode == "dynamic":
            return DynamicStepper(self.bundle.session("decoder_step"), cross, batch, self.m.dim, self.layout,
                                  self.device), lambda: None
        sess = self.bundle.session("decoder_step_static")
        graphs = "capture" if self.bundle.cuda_graph else "none"
        with self._static_lock:
            stepper = self._static.get(batch)
            if stepper is None:
                stepper = self._static[batch] = StaticStepper(sess, batch, self.m.dim, self.layout, self.device,
                                                              graphs)
        if not stepper.lock.acquire(blocking=False):  # in use by another thread: a private, uncaptured one
            stepper = StaticStepper(sess, batch, self.m.dim, self.layout, self.device,
                                    "off" if self.bundle.cuda_graph else "none")
            stepper.lock.acquire()
        stepper.reset(cross)
        return stepper, stepper.lock.release

    # ------------------------------------------------------------------------------------------- generation
    def iter_frames(self, points: np.ndarray, pitches: np.ndarray, n_frames: int | None = None,
                    chunk: int | None = None, between_steps: Callable[[], None] | None = None,
                    first_chunk: int | None = None) -> Iterator[np.ndarray]:
        """Generate notes frame by frame from <BOS>; yield frames (B, dim, c) as chunks fill up.

        Chunks start at `first_chunk` frames and double up to `chunk` (a streamed note starts sooner and then
        gets ahead); the last one may be shorter. `between_steps` is called before every step (the prerender
        thread uses it to give way to streaming).
        """
        n = self.m.frames if n_frames is None else int(n_frames)
        if not 1 <= n <= self.m.kv.max_length:
            raise SynthError(f"n_frames must be in 1..{self.m.kv.max_length}, got {n}")
        z, pidx = self.conditions(points, pitches)
        chunk = n if chunk is None else max(1, int(chunk))
        want = min(chunk, max(1, int(first_chunk or chunk)))
        stepper, release = self._stepper(self._cross_kv(z, pidx), len(pidx))
        try:
            buf = np.empty((len(pidx), self.m.dim, chunk), np.float32)
            filled = 0
            for p in range(n):
                if between_steps is not None:
                    between_steps()
                buf[:, :, filled] = stepper.step(p)
                filled += 1
                if filled == want or p == n - 1:
                    yield buf[:, :, :filled].copy()
                    filled, want = 0, min(chunk, 2 * want)
        finally:
            release()

    def generate(self, points: np.ndarray, pitches: np.ndarray, n_frames: int | None = None,
                 between_steps: Callable[[], None] | None = None) -> np.ndarray:
        """points (B, 2), MIDI pitches (B,) -> codec frames (B, dim, n_frames) float32."""
        return np.concatenate(list(self.iter_frames(points, pitches, n_frames, between_steps=between_steps)), axis=2)

    def decode(self, frames: np.ndarray) -> np.ndarray:
        """Codec frames (B, dim, T) -> audio (B, T*hop) float32 at the bundle's sample rate."""
        sess = self.bundle.session("codec_decoder")
        return sess.run(["audio"], {"emb": np.ascontiguousarray(frames, np.float32)})[0]

    def render(self, points: np.ndarray, pitches: np.ndarray, batch_size: int = 25, n_frames: int | None = None,
               progress: Callable[[int], None] | None = None,
               between_steps: Callable[[], None] | None = None) -> np.ndarray:
        """Whole notes in batches: points (N, 2), MIDI pitches (N,) -> audio (N, samples) float32.

        Where the streaming decoder reproduces the whole-note decode (`pipelines`), each batch is decoded while it
        is generated, on a second thread; otherwise after. `progress(k)` is called after each batch of k notes.
        """
        points, pitches = np.atleast_2d(points), np.atleast_1d(pitches)
        self.conditions(points, pitches)  # fail before any work
        n = self.m.frames if n_frames is None else int(n_frames)
        pipelined = self.pipelines(n)
        parts = []
        for i in range(0, len(pitches), batch_size):
            p, q = points[i:i + batch_size], pitches[i:i + batch_size]
            if pipelined:
                parts.append(self._render_pipelined(p, q, n, between_steps))
            else:
                parts.append(self.decode(self.generate(p, q, n, between_steps)))
            if progress is not None:
                progress(len(q))
        return np.concatenate(parts) if parts else np.zeros((0, self.m.note_samples), np.float32)

    def pipelines(self, n_frames: int) -> bool:
        """Whether notes of `n_frames` can be decoded while they are generated with the same audio as after: the
        bundle streams, the codec's streamed decode is the whole one (no lookahead, or a tail state that holds
        the rest), and the note is at least one pipeline chunk long."""
        m = self.m
        exact = m.stream_latency == 0 or m.stream_tail is not None
        return (self.bundle.has("codec_decoder_stream") and exact
                and n_frames >= max(PIPELINE_CHUNK, m.stream_min_first_frames, m.stream_latency // m.hop + 1))

    def _render_pipelined(self, points: np.ndarray, pitches: np.ndarray, n_frames: int,
                          between_steps: Callable[[], None] | None) -> np.ndarray:
        """Generate on this thread; decode each PIPELINE_CHUNK of frames on another with the streaming decoder;
        append the tail state (the full decode's last samples). Equal to decode(generate(...))."""
        dec = StreamDecoder(self.bundle.session("codec_decoder_stream"), self.m.stream_state, len(pitches),
                            self.m.stream_latency, self.m.stream_tail)
        todo: queue.Queue = queue.Queue()
        audio: list[np.ndarray] = []
        failed: list[BaseException] = []

        def decode_chunks() -> None:
            while (frames := todo.get()) is not None:
                if not failed:
                    try:
                        audio.append(dec.push(frames))
                    except Exception as e:  # noqa: BLE001 - re-raised on the generating thread
                        failed.append(e)
        worker = threading.Thread(target=decode_chunks, name="pgesam-render-decode", daemon=True)
        worker.start()
        try:
            for frames in self.iter_frames(points, pitches, n_frames, PIPELINE_CHUNK, between_steps):
                if failed:
                    break
                todo.put(frames)
        finally:
            todo.put(None)
            worker.join()
        if failed:
            raise failed[0]
        if (rest := dec.rest()) is not None:
            audio.append(rest)
        return np.concatenate(audio, axis=1)

    def stream(self, point: Sequence[float], pitch: int, chunk: int | None = None,
               n_frames: int | None = None, first_chunk: int = 2) -> Iterator[np.ndarray]:
        """One note as audio chunks (float32) as soon as each chunk of frames exists: `first_chunk` frames,
        doubling up to `chunk`. The first chunk is at least long enough to outlast the codec's latency and at
        least the codec's `min_first_frames`. Where the codec has a stream tail, it comes last, so the chunks
        together are the rendered note.

        Without codec_decoder_stream in the bundle, the whole note is yielded at once after generation.
        """
        chunk = chunk or self.stream_chunk
        first_chunk = max(first_chunk, self.m.stream_latency // self.m.hop + 1, self.m.stream_min_first_frames)
        if not self.bundle.has("codec_decoder_stream"):
            log.warning("bundle has no codec_decoder_stream: the note plays after its whole generation")
            yield self.decode(self.generate([point], [pitch], n_frames))[0]
            return
        dec = StreamDecoder(self.bundle.session("codec_decoder_stream"), self.m.stream_state, 1,
                            self.m.stream_latency, self.m.stream_tail)
        for frames in self.iter_frames([point], [pitch], n_frames, chunk, first_chunk=first_chunk):
            yield dec.push(frames)[0]
        if (rest := dec.rest()) is not None:
            yield rest[0]  # streamed == rendered

    # ------------------------------------------------------------------------------------------- encoding
    def encode_audio(self, audio: np.ndarray, sample_rate: int, k: int = 3) -> Encoded:
        """Mono or (samples, channels) audio -> its map point, MIDI pitch and the k nearest instruments."""
        import soxr
        a = np.asarray(audio, np.float32)
        if a.ndim == 2:
            a = a.mean(axis=1)
        if a.ndim != 1 or len(a) == 0 or not np.isfinite(a).all():
            raise SynthError("audio to encode must be a non-empty, finite mono or multichannel signal")
        if sample_rate != self.m.sample_rate:
            a = soxr.resample(a, sample_rate, self.m.sample_rate).astype(np.float32)
        n = self.m.note_samples
        a = np.pad(a[:n], (0, max(0, n - len(a))))[None]  # (1, samples)
        emb = self.bundle.session("codec_encoder").run(["emb"], {"audio": a})[0]  # (1, dim, T)
        t = self.m.frames
        emb = np.pad(emb[:, :, :t], ((0, 0), (0, 0), (0, max(0, t - emb.shape[2]))))
        mu, _, logits = self.bundle.session("vae_encoder").run(["mu", "logvar", "pitch_logits"], {"emb": emb})
        x, y = float(mu[0, 0]), float(mu[0, 1])
        return Encoded(x, y, int(np.argmax(logits[0])) + self.m.pitch_min, self.m.map.nearest(x, y, k))
