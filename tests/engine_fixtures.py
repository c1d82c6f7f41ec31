"""A tiny model bundle that follows docs/bundle.md exactly, built from hand-written ONNX graphs (no torch).

The graphs are small but honest, so the engine's runtime logic is really exercised:
    transformer_encoder   cross_k{i}/cross_v{i} carry (z_x, z_y, f0/1000) of each note, f0 from the MIDI pitch,
                          scaled differently per tensor; the steps read the last layer's values
    decoder_step          a linear recurrence that appends one entry per step to each of the 2L per-layer cache
                          tensors (tensor j gets the entry times j + 1) and reads them all back (channel 4 = 0.01 *
                          sum of channel 1 over every cached frame, each tensor divided by its own factor), so a
                          runtime that drops, copies wrongly, swaps or resets a cache tensor gives different frames
    decoder_step_static   the same recurrence on preallocated caches written at `position`
    codec_decoder(_stream) a harmonic oscillator: channel 0 = f0/1000, channels 1-3 = amplitudes of harmonics 1-3;
                          the streaming graph carries the oscillator phase as its state (`in_phase`/`out_phase`)
    codec_encoder         per-frame zero-crossing rate and RMS;  vae_encoder: a point from them, pitch logits
                          peaked at the MIDI pitch of the zero-crossing frequency
`reference_frames` computes in numpy what the decoder-step graphs compute, for parity tests. The oscillator's
phase state is kept in cycles (wrapped to [0, 1)) and accumulated in float64, so streamed and whole-note audio
agree to float32 rounding. Also here: the pytest fixture `tiny_bundle`, a python-osc test client, and signal
helpers (onsets, dominant frequency) for checking recorded performances.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

SR, HOP, DIM, PITCH_MIN, PITCH_MAX = 24000, 320, 128, 48, 72
LAYERS, HEADS, HEAD_DIM, ENC_LEN = 2, 2, 8, 3
OPSET = 18
INSTRUMENTS = [
    {"name": "keyboard_acoustic_000", "family": "keyboard", "x": 0.1, "y": -0.4, "soundfont": "fluidr3",
     "program": 0, "preset": "Yamaha Grand Piano"},
    {"name": "organ_electronic_001", "family": "organ", "x": -0.6, "y": 0.3, "soundfont": "fluidr3",
     "program": 16, "preset": "Drawbar Organ"},
    {"name": "flute_acoustic_002", "family": "flute", "x": 0.5, "y": 0.5, "soundfont": "timgm6mb",
     "program": 73, "preset": "Flute"},
]


def f0_of(midi: np.ndarray | float) -> np.ndarray:
    """Equal-tempered frequency in Hz of a MIDI pitch (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


class _G:
    """A small helper that accumulates ONNX nodes and constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, value: np.ndarray | float | list, dtype: type = np.float32) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        self.n += 1
        name = out or f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def pick(self, x: str, index: int, axis: int) -> str:
        """x with `axis` removed by taking `index` along it (Gather with a scalar index)."""
        return self.op("Gather", x, self.const(index, np.int64), axis=axis)

    def channel(self, x: str, c: int) -> str:
        """x[:, c] of a (B, C) tensor -> (B,)."""
        return self.pick(x, c, 1)

    def model(self, graph: str, inputs: list, outputs: list, frames: int) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, graph, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="engine_fixtures")
        m.ir_version = 8
        meta = {"pgesam_format": "pgesam-bundle", "pgesam_version": "2", "graph": graph, "sample_rate": str(SR),
                "frame_rate": str(SR // HOP), "frames": str(frames), "pitch_min": str(PITCH_MIN),
                "pitch_max": str(PITCH_MAX)}
        helper.set_model_props(m, meta)
        onnx.checker.check_model(m)
        return m


def _vi(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


F, I64 = TensorProto.FLOAT, TensorProto.INT64
KV_LAYOUT = ["batch", "heads", "length", "head_dim"]
CROSS = [f"cross_{kv}{i}" for i in range(LAYERS) for kv in "kv"]
SELF_IN = [f"in_self_{kv}{i}" for i in range(LAYERS) for kv in "kv"]
SELF_OUT = [f"out_self_{kv}{i}" for i in range(LAYERS) for kv in "kv"]


def _cross_scale(j: int) -> float:
    """Cross tensor j (cross_k0, cross_v0, cross_k1, ...) holds the conditioning times this."""
    return (j + 1.0) * (-1.0) ** j


def transformer_encoder(frames: int) -> onnx.ModelProto:
    g = _G()
    midi = g.op("Add", g.op("Cast", "pitch_index", to=F), g.const(PITCH_MIN - 69.0))
    f0 = g.op("Mul", g.op("Pow", g.const(2.0), g.op("Div", midi, g.const(12.0))), g.const(440.0 / 1000.0))
    v = g.op("Concat", "z", g.op("Unsqueeze", f0, g.const([1], np.int64)), axis=1)  # (B, 3)
    base = g.op("Expand", g.op("Reshape", v, g.const([-1, 1, ENC_LEN, 1], np.int64)),
                g.const([1, HEADS, 1, HEAD_DIM], np.int64))  # (B, H, 3, hd)
    for j, name in enumerate(CROSS):
        g.op("Mul", base, g.const(_cross_scale(j)), out=name)
    g.op("Expand", g.op("Reshape", v, g.const([-1, ENC_LEN, 1], np.int64)),
         g.const([1, 1, HEADS * HEAD_DIM], np.int64), out="memory")
    return g.model("transformer_encoder", [_vi("z", F, ["B", 2]), _vi("pitch_index", I64, ["B"])],
                   [_vi("memory", F, ["B", ENC_LEN, HEADS * HEAD_DIM]),
                    *(_vi(n, F, ["B", HEADS, ENC_LEN, HEAD_DIM]) for n in CROSS)], frames)


def _step_body(g: _G, position_is_zero: str) -> tuple[str, str, list[str]]:
    """Shared recurrence -> (conditioning (B, 3), new amplitude (B,), the new entry of each cache (B, H, 1, hd))."""
    last = len(CROSS) - 1
    cond = g.op("Mul", g.pick(g.pick(CROSS[last], 0, 1), 0, 2), g.const(1.0 / _cross_scale(last)))  # (B, 3)
    onset = g.op("Cast", position_is_zero, to=F)
    amp = g.op("Add", g.op("Mul", g.channel("frame", 1), g.const(0.985)), g.op("Mul", onset, g.const(0.8)))
    head = g.op("Slice", "frame", g.const([0], np.int64), g.const([HEAD_DIM], np.int64), g.const([1], np.int64))
    entry = g.op("Expand", g.op("Reshape", head, g.const([-1, 1, 1, HEAD_DIM], np.int64)),
                 g.const([1, HEADS, 1, 1], np.int64))  # (B, H, 1, hd)
    return cond, amp, [g.op("Mul", entry, g.const(j + 1.0)) for j in range(len(SELF_IN))]


def _next_frame(g: _G, cond: str, amp: str, hist: str) -> None:
    """next_frame (B, 128) = [f0/1000, a1, a2, a3, 0.01 * cache sum, 0...]."""
    def col(x: str) -> str:
        return g.op("Unsqueeze", x, g.const([1], np.int64))

    def harmonic(z: str) -> str:
        w = g.op("Mul", g.op("Add", g.op("Clip", z, g.const(-1.0), g.const(1.0)), g.const(1.0)), g.const(0.25))
        return g.op("Mul", amp, w)

    rest = g.op("Mul", g.op("Slice", "frame", g.const([5], np.int64), g.const([DIM], np.int64),
                            g.const([1], np.int64)), g.const(0.0))
    g.op("Concat", col(g.channel(cond, 2)), col(amp), col(harmonic(g.channel(cond, 0))),
         col(harmonic(g.channel(cond, 1))), col(g.op("Mul", hist, g.const(0.01))), rest, axis=1, out="next_frame")


def _cache_sum(g: _G, weight: str | None = None) -> str:
    """Mean over the cache tensors of (sum over positions of out[:, 0, :, 1], optionally weighted) / (j + 1) -> (B,)."""
    sums = []
    for j, name in enumerate(SELF_OUT):
        channel = g.pick(g.pick(name, 0, 1), 1, 2)  # (B, length)
        if weight is not None:
            channel = g.op("Mul", channel, weight)
        sums.append(g.op("Mul", g.op("ReduceSum", channel, g.const([1], np.int64), keepdims=0),
                         g.const(1.0 / ((j + 1.0) * len(SELF_OUT)))))
    return g.op("Sum", *sums)


def decoder_step(frames: int) -> onnx.ModelProto:
    g = _G()
    cond, amp, entries = _step_body(g, g.op("Equal", "position", g.const(0, np.int64)))
    for name_in, name_out, entry in zip(SELF_IN, SELF_OUT, entries):
        g.op("Concat", name_in, entry, axis=2, out=name_out)
    _next_frame(g, cond, amp, _cache_sum(g))
    return g.model("decoder_step", [_vi("frame", F, ["B", DIM]), _vi("position", I64, []),
                                    *(_vi(n, F, ["B", HEADS, ENC_LEN, HEAD_DIM]) for n in CROSS),
                                    *(_vi(n, F, ["B", HEADS, "P", HEAD_DIM]) for n in SELF_IN)],
                   [_vi("next_frame", F, ["B", DIM]), *(_vi(n, F, ["B", HEADS, "P1", HEAD_DIM]) for n in SELF_OUT)],
                   frames)


def decoder_step_static(frames: int) -> onnx.ModelProto:
    g = _G()
    cond, amp, entries = _step_body(g, g.op("Equal", "position", g.const([0], np.int64)))
    slots = g.const(np.arange(frames), np.int64)
    write = g.op("Reshape", g.op("Equal", slots, "position"), g.const([1, 1, frames, 1], np.int64))
    for name_in, name_out, entry in zip(SELF_IN, SELF_OUT, entries):
        g.op("Where", write, entry, name_in, out=name_out)
    valid = g.op("Cast", g.op("LessOrEqual", slots, "position"), to=F)  # (frames,)
    _next_frame(g, cond, amp, _cache_sum(g, valid))
    kv = ["B", HEADS, frames, HEAD_DIM]
    return g.model("decoder_step_static", [_vi("frame", F, ["B", DIM]), _vi("position", I64, [1]),
                                           *(_vi(n, F, ["B", HEADS, ENC_LEN, HEAD_DIM]) for n in CROSS),
                                           *(_vi(n, F, kv) for n in SELF_IN)],
                   [_vi("next_frame", F, ["B", DIM]), *(_vi(n, F, kv) for n in SELF_OUT)], frames)


def codec_decoder(frames: int, stream: bool) -> onnx.ModelProto:
    g = _G()
    src = "frames" if stream else "emb"
    params = g.op("Slice", src, g.const([0], np.int64), g.const([4], np.int64), g.const([1], np.int64))
    up = g.op("Expand", g.op("Unsqueeze", params, g.const([-1], np.int64)), g.const([1, 1, 1, HOP], np.int64))
    up = g.op("Reshape", up, g.const([0, 4, -1], np.int64))  # (B, 4, T*hop): per-sample parameters
    inc = g.op("Cast", g.op("Mul", g.channel(up, 0), g.const(1000.0 / SR)), to=TensorProto.DOUBLE)  # cycles
    cycles = g.op("CumSum", inc, g.const(1, np.int64))  # float64: no drift over a 4 s note
    if stream:
        cycles = g.op("Add", cycles, g.op("Cast", "in_phase", to=TensorProto.DOUBLE))
        last = g.op("Slice", cycles, g.const([-1], np.int64), g.const([2 ** 62], np.int64), g.const([1], np.int64))
        g.op("Cast", g.op("Mod", last, g.const(1.0, np.float64), fmod=1), to=F, out="out_phase")
    phase = g.op("Cast", g.op("Mul", g.op("Mod", cycles, g.const(1.0, np.float64), fmod=1),
                              g.const(2.0 * np.pi, np.float64)), to=F)
    parts = [g.op("Mul", g.channel(up, k), g.op("Sin", g.op("Mul", phase, g.const(float(k))))) for k in (1, 2, 3)]
    g.op("Sum", *parts, out="audio")
    if stream:
        ins = [_vi("frames", F, ["B", DIM, "t"]), _vi("in_phase", F, ["B", 1])]
        outs = [_vi("audio", F, ["B", "samples"]), _vi("out_phase", F, ["B", 1])]
        return g.model("codec_decoder_stream", ins, outs, frames)
    return g.model("codec_decoder", [_vi("emb", F, ["B", DIM, "T"])], [_vi("audio", F, ["B", "samples"])], frames)


def codec_encoder(frames: int) -> onnx.ModelProto:
    g = _G()
    n = g.op("Gather", g.op("Shape", "audio"), g.const(1, np.int64))
    hop = g.const(HOP, np.int64)
    pad = g.op("Mod", g.op("Sub", hop, g.op("Mod", n, hop)), hop)
    pads = g.op("Concat", g.const([0, 0, 0], np.int64), g.op("Unsqueeze", pad, g.const([0], np.int64)), axis=0)
    x = g.op("Reshape", g.op("Pad", "audio", pads), g.const([0, -1, HOP], np.int64))  # (B, T, hop)
    rms = g.op("Sqrt", g.op("ReduceMean", g.op("Mul", x, x), g.const([2], np.int64), keepdims=0))
    s = g.op("Sign", x)
    a = g.op("Slice", s, g.const([1], np.int64), g.const([HOP], np.int64), g.const([2], np.int64))
    b = g.op("Slice", s, g.const([0], np.int64), g.const([HOP - 1], np.int64), g.const([2], np.int64))
    zcr = g.op("Mul", g.op("ReduceMean", g.op("Abs", g.op("Sub", a, b)), g.const([2], np.int64), keepdims=0),
               g.const(0.5))  # crossings per sample, (B, T)
    feats = g.op("Concat", g.op("Unsqueeze", zcr, g.const([1], np.int64)),
                 g.op("Unsqueeze", rms, g.const([1], np.int64)), axis=1)  # (B, 2, T)
    zeros = g.op("Mul", g.op("Expand", g.op("Unsqueeze", rms, g.const([1], np.int64)),
                             g.const([1, DIM - 2, 1], np.int64)), g.const(0.0))
    g.op("Concat", feats, zeros, axis=1, out="emb")
    return g.model("codec_encoder", [_vi("audio", F, ["B", "samples"])], [_vi("emb", F, ["B", DIM, "T"])], frames)


def vae_encoder(frames: int) -> onnx.ModelProto:
    g = _G()
    zcr, rms = g.channel("emb", 0), g.channel("emb", 1)  # (B, T)
    axis = g.const([1], np.int64)
    energy = g.op("Add", g.op("ReduceSum", rms, axis, keepdims=1), g.const(1e-9))
    rate = g.op("Div", g.op("ReduceSum", g.op("Mul", zcr, rms), axis, keepdims=1), energy)  # (B, 1)
    level = g.op("ReduceMean", rms, axis, keepdims=1)
    feats = g.op("Concat", rate, level, axis=1)  # (B, 2)
    g.op("Tanh", g.op("Add", g.op("MatMul", feats, g.const([[40.0, -30.0], [3.0, 5.0]])), g.const([-0.5, 0.2])),
         out="mu")
    g.op("Mul", feats, g.const(0.0), out="logvar")
    hz = g.op("Mul", rate, g.const(SR / 2.0))
    midi = g.op("Add", g.op("Mul", g.op("Log", g.op("Div", g.op("Add", hz, g.const(1e-6)), g.const(440.0))),
                            g.const(12.0 / np.log(2.0))), g.const(69.0))  # (B, 1)
    d = g.op("Sub", midi, g.const(np.arange(PITCH_MIN, PITCH_MAX + 1, dtype=np.float32)[None]))
    g.op("Neg", g.op("Mul", d, d), out="pitch_logits")
    return g.model("vae_encoder", [_vi("emb", F, ["B", DIM, frames])],
                   [_vi("mu", F, ["B", 2]), _vi("logvar", F, ["B", 2]),
                    _vi("pitch_logits", F, ["B", PITCH_MAX - PITCH_MIN + 1])], frames)


def _shapes(values: list) -> dict:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def build_bundle(out: Path, frames: int = 300, with_static: bool = True) -> Path:
    """Write the tiny bundle (graphs + manifest.json) into `out` and return it. `frames` = notes' length."""
    out.mkdir(parents=True, exist_ok=True)
    models = {"transformer_encoder": transformer_encoder(frames), "decoder_step": decoder_step(frames),
              "codec_decoder": codec_decoder(frames, False), "codec_decoder_stream": codec_decoder(frames, True),
              "codec_encoder": codec_encoder(frames), "vae_encoder": vae_encoder(frames)}
    if with_static:
        models["decoder_step_static"] = decoder_step_static(frames)
    graphs = {}
    for name, m in models.items():
        data = m.SerializeToString()
        (out / f"{name}.onnx").write_bytes(data)
        graphs[name] = {"file": f"{name}.onnx", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "inputs": _shapes(m.graph.input), "outputs": _shapes(m.graph.output)}
    manifest = {
        "format": "pgesam-bundle", "version": 2, "sample_rate": SR, "frame_rate": SR // HOP, "hop": HOP,
        "frames": frames, "dim": DIM, "pitch_min": PITCH_MIN, "pitch_max": PITCH_MAX,
        "kv_cache": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "encoder_length": ENC_LEN,
                     "max_length": frames, "layout": KV_LAYOUT, "cross": CROSS,
                     "self": [[i, o] for i, o in zip(SELF_IN, SELF_OUT)]},
        "codec_stream": {"state": [{"name": "phase", "shape": [1, 1]}], "latency_samples": 0},
        "map": {"bounds": {"x": [-1.0, 1.0], "y": [-1.0, 1.0]}, "radius": 1.0, "instruments": INSTRUMENTS},
        "configs": {"codec": {}, "vae": {}, "transformer": {}},
        "codec": {"backend": "fixture-oscillator", "origin": "tests/engine_fixtures.py", "weights": "none"},
        "data": {"dataset": "fixture", "licences": []},
        "graphs": graphs, "created_by": "tests/engine_fixtures.py",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def reference_frames(z: np.ndarray, midi: np.ndarray, frames: int = 300) -> np.ndarray:
    """What the decoder-step graphs generate: z (B, 2), MIDI pitches (B,) -> frames (B, 128, frames) float64."""
    z, midi = np.asarray(z, np.float64), np.asarray(midi)
    b = len(midi)
    f0 = f0_of(midi) / 1000.0
    frame = np.zeros((b, DIM))
    cache_sum = np.zeros(b)
    out = np.zeros((b, DIM, frames))
    for p in range(frames):
        amp = 0.985 * frame[:, 1] + (0.8 if p == 0 else 0.0)
        cache_sum = cache_sum + frame[:, 1]
        nxt = np.zeros((b, DIM))
        nxt[:, 0], nxt[:, 1] = f0, amp
        nxt[:, 2] = amp * 0.25 * (np.clip(z[:, 0], -1, 1) + 1)
        nxt[:, 3] = amp * 0.25 * (np.clip(z[:, 1], -1, 1) + 1)
        nxt[:, 4] = 0.01 * cache_sum
        out[:, :, p] = frame = nxt
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture bundle, built once per test session (read-only: copy it before tampering)."""
    return build_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


class OscClient:
    """python-osc's SimpleUDPClient plus reply collection: `ask` sends and gathers replies until quiet."""

    def __init__(self, host: str, port: int):
        from pythonosc.udp_client import SimpleUDPClient
        self.client = SimpleUDPClient(host, port)

    def send(self, address: str, *args: object) -> None:
        self.client.send_message(address, list(args))

    def send_bundle(self, at: float, messages: list[tuple[str, list]]) -> None:
        from pythonosc.osc_bundle_builder import OscBundleBuilder
        from pythonosc.osc_message_builder import OscMessageBuilder
        b = OscBundleBuilder(at)
        for address, args in messages:
            m = OscMessageBuilder(address)
            for a in args:
                m.add_arg(a)
            b.add_content(m.build())
        self.client.send(b.build())

    def replies(self, timeout: float = 2.0, quiet: float = 0.2) -> list[tuple[str, list]]:
        """Replies until none came for `quiet` seconds (waiting up to `timeout` for the first)."""
        from pythonosc.osc_message import OscMessage
        out: list[tuple[str, list]] = []
        data = self.client.receive(timeout)
        while data:
            msg = OscMessage(data)
            out.append((msg.address, list(msg.params)))
            data = self.client.receive(quiet)
        return out

    def ask(self, address: str, *args: object, timeout: float = 5.0) -> list[tuple[str, list]]:
        self.send(address, *args)
        return self.replies(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ping until the server answers."""
        end = time.time() + timeout
        while time.time() < end:
            if ("/pgesam/pong", []) in self.ask("/pgesam/ping", timeout=0.3):
                return
        raise TimeoutError("the OSC server did not answer /pgesam/ping")

    def status(self) -> dict:
        for address, args in self.ask("/pgesam/status"):
            if address == "/pgesam/status":
                return dict(zip(args[::2], args[1::2]))
        raise AssertionError("no /pgesam/status reply")

    def close(self) -> None:
        self.client.close()


def onsets(audio: np.ndarray, threshold: float = 1e-3, min_gap: int = 2400) -> list[int]:
    """Sample indices where sound starts after at least `min_gap` samples of silence (|x| <= threshold)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if not len(loud):
        return []
    starts = [int(loud[0])]
    gaps = np.flatnonzero(np.diff(loud) > min_gap)
    starts += [int(loud[i + 1]) for i in gaps]
    return starts


def dominant_hz(audio: np.ndarray, sr: int = SR) -> float:
    """Frequency of the strongest spectral peak (Hann window, parabolic interpolation)."""
    x = audio * np.hanning(len(audio))
    spec = np.abs(np.fft.rfft(x))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + shift) * sr / len(audio)


# ------------------------------------------------------------------------------------------------ hardening helpers
REPO = Path(__file__).resolve().parents[1]
PGESAM = [__import__("sys").executable, "-c", "from pgesam_engine.cli import main; main()"]


def spawn_serve(bundle: Path, log: Path, *args: str, cwd: Path | None = None,
                timeout: float = 60.0) -> tuple["subprocess.Popen", int]:
    """`pgesam serve` on `bundle` (CPU, one thread, a free port) in a subprocess -> (process, port).

    Its stderr goes to the file `log` (a pipe nobody reads could fill and stall the server); stdout is a pipe
    whose first line gives the port. Kill the process when done.
    """
    import re
    import subprocess
    err = open(log, "w")
    proc = subprocess.Popen([*PGESAM, "serve", "--bundle", str(bundle), "--port", "0", "--provider", "cpu",
                             "--threads", "1", *args], cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=err,
                            text=True)
    err.close()
    line = proc.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    if match is None:
        proc.kill()
        proc.wait(timeout)
        raise RuntimeError(f"serve did not start: {line!r} {Path(log).read_text()[-2000:]}")
    return proc, int(match.group(1))


def udp_socket(host: str = "127.0.0.1") -> "socket.socket":
    """A UDP socket bound to `host` (any port): a raw OSC client. Linux routes all of 127.0.0.0/8 to lo."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def drain(sock: "socket.socket", wait: float = 0.0) -> list[tuple[str, list]]:
    """Every OSC reply waiting on `sock` (waiting up to `wait` seconds for the first) as (address, args)."""
    import socket
    from pythonosc.osc_message import OscMessage
    out: list[tuple[str, list]] = []
    sock.settimeout(max(0.0, wait))  # 0.0: non-blocking
    try:
        while True:
            msg = OscMessage(sock.recv(65536))
            out.append((msg.address, list(msg.params)))
            sock.settimeout(0.0)
    except (BlockingIOError, socket.timeout):
        pass
    finally:
        sock.settimeout(None)
    return out


def ask_raw(sock: "socket.socket", to: tuple[str, int], address: str, *args: object,
            expect: str | None = None, timeout: float = 10.0) -> list[tuple[str, list]]:
    """Send one message from `sock` and collect replies until `expect` arrives (or `timeout` passes)."""
    from pythonosc.osc_message_builder import OscMessageBuilder
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    sock.sendto(b.build().dgram, to)
    end, out = time.time() + timeout, []
    while time.time() < end:
        got = drain(sock, wait=min(0.5, max(0.01, end - time.time())))
        out += got
        if expect is None and got or expect is not None and any(a == expect for a, _ in got):
            break
    return out


def status_of(replies: list[tuple[str, list]]) -> dict:
    """The /pgesam/status reply among `replies` as a dict."""
    for address, args in replies:
        if address == "/pgesam/status":
            return dict(zip(args[::2], args[1::2]))
    raise AssertionError(f"no /pgesam/status reply in {replies[:5]}")
