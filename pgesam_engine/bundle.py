"""Load and verify a model bundle (docs/bundle.md, format version 1) and open one onnxruntime session per graph.

Everything the engine knows about the model comes from `manifest.json` and the ONNX metadata written by the
exporter (sherpa-onnx habit): shapes, sample rate, frame rate, pitch range, map bounds. Nothing is guessed.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .hashing import sha256_of

log = logging.getLogger("pgesam.bundle")

FORMAT = "pgesam-bundle"
SUPPORTED_VERSIONS = (2,)  # 2: per-layer KV cache tensors (docs/bundle.md); 1 stacked them in one
REQUIRED_GRAPHS = ("transformer_encoder", "decoder_step", "codec_decoder")
OPTIONAL_GRAPHS = ("decoder_step_static", "codec_decoder_stream", "codec_encoder", "vae_encoder")
STEP_GRAPHS = ("decoder_step", "decoder_step_static")
# intra-op threads of the decoder step on CPU: its products are too small to split (a step's 100-odd ops each wake
# the pool: 2 threads made a 300-step note 0.18-0.31 s against 0.11-0.17 s for 1, int8, 2 cores); batch-level
# parallelism (prerender workers, a streamed note beside a prerender) uses the other cores instead
CPU_STEP_THREADS = 1
PROVIDER_ALIASES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"
AUTO_VARIANT = "auto"  # the CPU variant below on CPU when the bundle has it, the float graphs otherwise
CPU_VARIANT = "int8"  # dynamic int8 (per-channel weights): the CPU's fastest graphs, measured without pitch loss


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class KVSpec:
    """Attention cache geometry: self_kv is (layers, 2, B, heads, length, head_dim)."""
    layers: int
    heads: int
    head_dim: int
    encoder_length: int
    max_length: int

    def self_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (self.layers, 2, batch, self.heads, length, self.head_dim)


@dataclass(frozen=True)
class TimbreMap:
    """The region of the timbre plane the training data covers, and the training instruments on it."""
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    radius: float
    instruments: tuple[dict, ...]

    def clamp(self, x: float, y: float, allow_outside: bool = False) -> tuple[float, float, bool]:
        """(x, y) moved onto the covered region (disc of `radius` inside the bounds) -> (x, y, was_moved).

        With `allow_outside` the point is returned as is (experimenters may go off the map).
        """
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ValueError(f"timbre point ({x}, {y}) is not a finite number pair")
        if allow_outside:
            return float(x), float(y), False
        cx, cy = float(x), float(y)
        r = float(np.hypot(cx, cy))
        if r > self.radius:
            cx, cy = cx * self.radius / r, cy * self.radius / r
        cx = min(max(cx, self.x_range[0]), self.x_range[1])
        cy = min(max(cy, self.y_range[0]), self.y_range[1])
        moved = abs(cx - x) > 1e-9 or abs(cy - y) > 1e-9
        return cx, cy, moved

    def nearest(self, x: float, y: float, k: int = 3) -> list[tuple[dict, float]]:
        """The k training instruments closest to (x, y), with their distances, closest first."""
        dist = [(inst, float(np.hypot(inst["x"] - x, inst["y"] - y))) for inst in self.instruments]
        return sorted(dist, key=lambda d: d[1])[:k]


@dataclass(frozen=True)
class Manifest:
    """The typed view of manifest.json the engine relies on; `raw` keeps everything else."""
    raw: dict
    sample_rate: int
    frame_rate: float
    hop: int
    frames: int
    dim: int
    pitch_min: int
    pitch_max: int
    kv: KVSpec
    stream_state: tuple[tuple[str, tuple[int, ...]], ...]
    stream_latency: int
    stream_min_first_frames: int  # the codec's first streamed chunk needs at least this many frames (EnCodec: 7)
    map: TimbreMap
    # the codec_decoder_stream output holding, after the last frame, the whole-note decode's last stream_latency
    # samples: out_<tail_state> (a state that also feeds the next call) or the manifest's tail_output (stft)
    stream_tail: str | None = None

    @property
    def n_pitches(self) -> int:
        return self.pitch_max - self.pitch_min + 1

    @property
    def note_samples(self) -> int:
        """Samples of one whole note: frames * hop."""
        return self.frames * self.hop


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where} has no {key!r}; the bundle does not follow docs/bundle.md (re-export it)")
    return d[key]


def parse_manifest(raw: dict, where: str = "manifest.json") -> Manifest:
    """Check format and version, then read the fields the engine needs -> Manifest."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where} holds a JSON {type(raw).__name__}, not an object; re-export the bundle")
    if raw.get("format") != FORMAT:
        raise BundleError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    version = raw.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise BundleError(f"{where}: bundle version {version} is not one this engine reads "
                          f"({', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade pgesam or re-export the bundle")
    try:
        return _typed_manifest(raw, where)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise BundleError(f"{where}: a field has the wrong type or shape ({type(e).__name__}: {e}); "
                          "the bundle does not follow docs/bundle.md (re-export it)") from e


def stream_tail_output(stream: dict) -> str | None:
    """The codec_decoder_stream output that holds the rest of the note after its last frame, from the manifest's
    `codec_stream`: its `tail_output`, or `out_<tail_state>`; None when it names neither (docs/bundle.md)."""
    if stream.get("tail_output"):
        return stream["tail_output"]
    return f"out_{stream['tail_state']}" if stream.get("tail_state") is not None else None


def _typed_manifest(raw: dict, where: str) -> Manifest:
    kv = _need(raw, "kv_cache", where)
    stream = raw.get("codec_stream", {})
    mp = _need(raw, "map", where)
    bounds = _need(mp, "bounds", f"{where} map")
    tail = stream.get("tail_state")
    if tail is not None and tail not in {s["name"] for s in stream.get("state", [])}:
        raise BundleError(f"{where}: codec_stream.tail_state {tail!r} is not one of its stream states; re-export it")
    return Manifest(
        raw=raw, sample_rate=int(_need(raw, "sample_rate", where)), frame_rate=float(_need(raw, "frame_rate", where)),
        hop=int(_need(raw, "hop", where)), frames=int(_need(raw, "frames", where)), dim=int(_need(raw, "dim", where)),
        pitch_min=int(_need(raw, "pitch_min", where)), pitch_max=int(_need(raw, "pitch_max", where)),
        kv=KVSpec(*(int(_need(kv, k, f"{where} kv_cache"))
                    for k in ("layers", "heads", "head_dim", "encoder_length", "max_length"))),
        stream_state=tuple((s["name"], tuple(int(v) for v in s["shape"])) for s in stream.get("state", [])),
        stream_latency=int(stream.get("latency_samples", 0)), stream_tail=stream_tail_output(stream),
        stream_min_first_frames=int(stream.get("min_first_frames", 1)),
        map=TimbreMap(tuple(map(float, bounds["x"])), tuple(map(float, bounds["y"])), float(mp.get("radius", 1.0)),
                      tuple(mp.get("instruments", []))))



def read_manifest(root: Path) -> Manifest:
    """Read root/manifest.json, check the version and every listed graph file's size and SHA-256."""
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no manifest.json (run `pgesam-train export`)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{path} is not text (UTF-8 JSON): corrupt or not a manifest; re-export the bundle") from e
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}): truncated or corrupt; re-export the bundle") from e
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from e
    manifest = parse_manifest(raw, str(path))
    graphs = _need(raw, "graphs", str(path))
    if not isinstance(graphs, dict) or not all(isinstance(e, dict) for e in graphs.values()):
        raise BundleError(f"{path}: 'graphs' must map graph names to objects; re-export the bundle")
    for name in REQUIRED_GRAPHS:
        if name not in graphs:
            raise BundleError(f"bundle at {root} lists no {name} graph; run `pgesam-train export`")
    for name, entry in graphs.items():
        _verify_file(root, name, entry)
    return manifest


def _verify_file(root: Path, name: str, entry: dict) -> None:
    rel = _need(entry, "file", f"manifest graph {name}")
    file = root / str(rel)
    if Path(str(rel)).is_absolute() or not file.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{root / 'manifest.json'}: graph {name} points at {rel!r}, outside the bundle folder "
                          "(tampered manifest); re-export the bundle")
    if not file.is_file():
        raise BundleError(f"bundle at {root} has no {file.name} (graph {name}); run `pgesam-train export`")
    if "bytes" in entry and file.stat().st_size != int(entry["bytes"]):
        raise BundleError(f"{file} is {file.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                          "the file was changed or truncated; re-export the bundle")
    expected = _need(entry, "sha256", f"manifest graph {name}")
    if sha256_of(file) != expected:
        raise BundleError(f"{file} does not match its SHA-256 in manifest.json (tampered or corrupt); "
                          "re-export the bundle")


@functools.lru_cache(maxsize=1)
def cuda_unusable_reason() -> str | None:
    """Why the CUDA provider cannot run here (None when it can load).

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without CUDA libraries; a session asked for it
    then logs an error and falls back to CPU. We load the provider library ourselves first (as onnxruntime would)
    so that "auto" only asks for CUDA when its libraries are really there, and say why not otherwise.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    capi = Path(ort.__file__).parent / "capi"
    shared, cuda = capi / "libonnxruntime_providers_shared.so", capi / "libonnxruntime_providers_cuda.so"
    if not cuda.is_file():  # not a Linux wheel layout: let onnxruntime decide
        return None
    try:
        ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(cuda))
    except OSError as e:
        return f"CUDA libraries missing ({e})"
    return None


def resolve_providers(requested: str | list[str] | None = None) -> list[str]:
    """Execution providers to try, in order: CUDA (when it can really load) then CPU by default, or `requested`
    ('cpu', 'cuda', 'cuda,cpu').

    Raises BundleError for a provider this onnxruntime build does not have or cannot load.
    """
    available = ort.get_available_providers()
    if requested is None or requested == "auto":
        cuda = ["CUDAExecutionProvider"] if cuda_unusable_reason() is None else []
        return cuda + ["CPUExecutionProvider"]
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    out = [PROVIDER_ALIASES.get(n.strip().lower(), n.strip()) for n in names if n.strip()]
    for p in out:
        if p not in available:
            raise BundleError(f"onnxruntime here has no {p} (available: {', '.join(available)})")
        if p == "CUDAExecutionProvider" and cuda_unusable_reason() is not None:
            raise BundleError(f"the CUDA provider cannot run here: {cuda_unusable_reason()}; use --provider cpu")
    return out


def session_options(threads: int | None, cpu_only: bool) -> ort.SessionOptions:
    """Full graph optimisation, sequential execution, `threads` intra-op threads; no spinning on CPU so that
    several sessions on few cores do not burn each other's time."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads if threads else max(1, min(4, os.cpu_count() or 1))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if cpu_only:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class Bundle:
    """A verified bundle with one open `ort.InferenceSession` per graph.

    Attributes: root (folder), manifest, sessions (graph name -> session), providers (what the sessions really
    use, from `get_providers()`), cuda_graph (whether decoder_step_static was opened for CUDA-graph capture).
    """

    def __init__(self, root: Path | str, providers: str | list[str] | None = None, threads: int | None = None,
                 variant: str | None = None, cuda_graph: bool = False, step_threads: int | None = None):
        self.root = Path(root).expanduser().resolve()
        self.manifest = read_manifest(self.root)
        self.requested = resolve_providers(providers)
        self.fallback = ""  # why CUDA was asked for but the sessions run on CPU
        self._threads, self._step_threads = threads, step_threads
        self._options = session_options(threads, cpu_only="CUDAExecutionProvider" not in self.requested)
        self.sessions: dict[str, ort.InferenceSession] = {}
        graphs = self.manifest.raw["graphs"]
        self.cuda_graph = cuda_graph and "CUDAExecutionProvider" in self.requested
        self._auto = variant == AUTO_VARIANT
        self._variant = choose_variant(variant, graphs, "CUDAExecutionProvider" not in self.requested, self.root)
        for name in [*REQUIRED_GRAPHS, *OPTIONAL_GRAPHS]:
            if name in graphs:
                self.sessions[name] = self._open(name, self._file_of(name))

    def _open(self, name: str, file: str) -> ort.InferenceSession:
        providers: list = list(self.requested)
        if name == "decoder_step_static" and self.cuda_graph:
            providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider"
                         else p for p in providers]
        options = self._options
        if name in STEP_GRAPHS and "CUDAExecutionProvider" not in self.requested:
            options = session_options(self.step_threads, cpu_only=True)
        try:
            sess = ort.InferenceSession(str(self.root / file), options, providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated types for a bad model
            if "CUDAExecutionProvider" not in self.requested:
                raise BundleError(f"onnxruntime cannot load {self.root / file}: {_first_line(e)}") from e
            self._cpu_fallback(f"the CUDA provider failed on {file} ({_first_line(e)})")
            return self._open(name, file)
        if "CUDAExecutionProvider" in self.requested and sess.get_providers()[0] != "CUDAExecutionProvider":
            self.fallback = self.fallback or f"CUDA was asked for but onnxruntime runs {file} on CPU"
        self._check_metadata(name, str(self.root / file), sess.get_modelmeta().custom_metadata_map)
        return sess

    def _cpu_fallback(self, reason: str) -> None:
        """Open this and every later session on CPU only, and remember why (`/pgesam/status` reports it)."""
        log.warning("%s; falling back to the CPU provider", reason)
        self.fallback = reason
        self.requested = ["CPUExecutionProvider"]
        self.cuda_graph = False
        self._options = session_options(self._threads, cpu_only=True)
        if self._auto:
            self._variant = choose_variant(AUTO_VARIANT, self.manifest.raw["graphs"], True, self.root)
        opened, self.sessions = self.sessions, {}
        for done in opened:  # graphs opened on CUDA before the failure move to CPU too
            self.sessions[done] = self._open(done, self._file_of(done))

    def _file_of(self, name: str) -> str:
        graphs = self.manifest.raw["graphs"]
        key = f"{name}.{self._variant}" if self._variant and f"{name}.{self._variant}" in graphs else name
        return graphs[key]["file"]

    def _check_metadata(self, name: str, file: str, meta: dict[str, str]) -> None:
        if meta.get("pgesam_format") != FORMAT:
            raise BundleError(f"{file} carries no pgesam-bundle metadata; it was not written by `pgesam-train export`")
        if meta.get("pgesam_version") not in {str(v) for v in SUPPORTED_VERSIONS}:
            raise BundleError(f"{file} is bundle version {meta.get('pgesam_version')}, this engine reads "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))}; re-export the bundle")
        m = self.manifest
        expect = {"sample_rate": m.sample_rate, "frames": m.frames, "pitch_min": m.pitch_min,
                  "pitch_max": m.pitch_max}
        for key, value in expect.items():
            if key in meta and int(float(meta[key])) != value:
                raise BundleError(f"{file} says {key}={meta[key]} but manifest.json says {value}; re-export")

    @property
    def variant(self) -> str | None:
        """The quantised variant whose graphs replace the float ones where the bundle has them (None: none)."""
        return self._variant

    @property
    def threads(self) -> int | None:
        """Intra-op threads per session as asked for (None: the default, min(4, CPUs))."""
        return self._threads

    @property
    def step_threads(self) -> int:
        """Intra-op threads of the decoder step sessions on CPU (CPU_STEP_THREADS unless asked otherwise)."""
        return self._step_threads or CPU_STEP_THREADS

    def has(self, graph: str) -> bool:
        return graph in self.sessions

    def session(self, graph: str) -> ort.InferenceSession:
        """The session of `graph`, or a BundleError saying the bundle lacks it."""
        if graph not in self.sessions:
            raise BundleError(f"bundle at {self.root} has no {graph} graph, which this needs; "
                              "re-export it with `pgesam-train export`")
        return self.sessions[graph]

    @property
    def providers(self) -> dict[str, list[str]]:
        """Graph name -> the providers its session really runs on (onnxruntime's own report)."""
        return {name: s.get_providers() for name, s in self.sessions.items()}

    @property
    def device(self) -> str:
        """'cuda' when the decoder step runs under the CUDA provider, else 'cpu'."""
        return "cuda" if self.sessions["decoder_step"].get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def provider(self) -> str:
        """The decoder step's active provider, e.g. 'CPUExecutionProvider'."""
        return self.sessions["decoder_step"].get_providers()[0]


def choose_variant(variant: str | None, graphs: dict, cpu_only: bool, root: Path) -> str | None:
    """The variant to open: `variant` itself (a BundleError when no graph of the bundle has it), or for "auto"
    CPU_VARIANT when the sessions run on CPU only and the bundle has it, else None (the float graphs)."""
    def has(v: str) -> bool:
        return any(entry.get("variant_of") and key.endswith(f".{v}") for key, entry in graphs.items())
    if variant == AUTO_VARIANT:
        return CPU_VARIANT if cpu_only and has(CPU_VARIANT) else None
    if variant and not has(variant):
        raise BundleError(f"bundle at {root} has no {variant!r} graphs; export it with "
                          f"`pgesam-train export --variant {variant}` or leave out --variant")
    return variant or None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def default_bundle_path() -> Path:
    """The bundle shipped as package data, or a BundleError telling the user what to pass instead."""
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return DEFAULT_BUNDLE
    raise BundleError("no bundle given and none is shipped with this install: pass --bundle PATH "
                      "or run `pgesam-train export` to make one")
