"""The clients in examples/ against the real programs, each driving `pgesam serve --audio file:...` over loopback.

* SuperCollider: sclang runs examples/supercollider/pgesam.scd headless; its Pbind notes go out as bundles
  timetagged 0.2 s ahead and must come out of the recording at the requested times (within one audio block),
  and sclang must print the engine's replies.
* Pd vanilla: a headless harness patch drives examples/pd/pgesam-osc.pd (the abstraction the client patch uses).
* liblo's oscsend/oscdump, an independent OSC implementation: every address with the types the engine's routing
  table declares. oscsend exits at once and cannot hear replies, so a byte-transparent UDP relay stands where a
  client's own socket would be and hands the engine's replies to oscdump.
* Max/MSP does not run on Linux: the .maxpat is checked as JSON, and every address and argument type it sends
  against the engine's routing table (pgesam_engine.osc.ROUTES).
The tiny fixture codec is an oscillator, so the pitch of each note can be checked in the recording too.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from engine_fixtures import SR, OscClient, dominant_hz, f0_of, onsets, spawn_serve, tiny_bundle  # noqa: F401
from test_engine_e2e import wait_prerendered

from pgesam_engine.osc import ERROR, ROUTES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BLOCK = 256  # `pgesam serve`'s default audio block, in samples
OSC_TYPE = {float: "f", int: "i", str: "s"}


def needs(program: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(program) is None,
                              reason=f"{program} is not installed (Debian package {package}; scripts/setup.sh)")


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:  # noqa: F811
    """`pgesam serve` recording to a WAV -> (process, port, WAV path); its log in tmp_path/serve.log."""
    wav = tmp_path / "performance.wav"
    proc, port = spawn_serve(tiny_bundle, tmp_path / "serve.log", "--audio", f"file:{wav}", "--out-dir",
                             str(tmp_path), "--in-dir", str(tmp_path))
    yield proc, port, wav
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stop_and_record(proc: subprocess.Popen, wav: Path) -> np.ndarray:
    """Stop `pgesam serve` as a musician would (Ctrl-C) and read its recording (samples,)."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out, (wav.parent / "serve.log").read_text()[-3000:]
    audio, sr = soundfile.read(str(wav), dtype="float32")
    assert sr == SR
    return audio


def assert_pitches(audio: np.ndarray, starts: list[int], pitches: list[int]) -> None:
    for start, pitch in zip(starts, pitches):
        assert dominant_hz(audio[start:start + SR // 5]) == pytest.approx(f0_of(pitch), rel=0.005), pitch


# --------------------------------------------------------------------------------------------- SuperCollider
@needs("sclang", "supercollider-language")
def test_supercollider_pbind_bundles_play_on_time_and_sclang_gets_the_replies(server: tuple, tmp_path: Path) -> None:
    proc, port, wav = server
    script = tmp_path / "run.scd"
    script.write_text('~pgesamOnDone = { 0.exit };\n'
                      'SystemClock.sched(45, { "pgesam test: timed out".postln; 1.exit });\n'
                      f'"{EXAMPLES / "supercollider" / "pgesam.scd"}".load;\n')
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QTWEBENGINE_DISABLE_SANDBOX": "1",
           "PGESAM_PORT": str(port), "PGESAM_RENDER": "sc-note.wav"}  # in serve's --out-dir
    r = subprocess.run(["sclang", "-D", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=90)
    out = r.stdout
    assert r.returncode == 0 and "timed out" not in out, out[-3000:] + r.stderr[-2000:]
    assert "pgesam error" not in out and "ERROR" not in out, out[-3000:]
    for line in ["pgesam pong", "pgesam map: 3 instruments", "pgesam instrument 0 keyboard_acoustic_000",
                 "pgesam timbre x 0.2", f"pgesam rendered {tmp_path.resolve() / 'sc-note.wav'}", "pgesam encoded x "]:
        assert line in out, f"sclang did not print {line!r}:\n{out[-3000:]}"
    status = dict(kv.split("=", 1) for kv in re.search(r"^pgesam status (.*)$", out, re.M).group(1).split(" ")
                  if "=" in kv)
    assert status["late"] == "0" and status["audio_errors"] == "0"
    assert float(status["timed_error_ms_p99"]) < 1000 * BLOCK / SR  # timetags honoured within one block
    notes = [(int(p), float(t)) for p, t in re.findall(r"^pgesam note (\d+) at ([\d.]+)$", out, re.M)]
    assert [p for p, _ in notes] == [60, 64, 67, 72, 67]

    audio = stop_and_record(proc, wav)
    starts = onsets(audio)
    assert len(starts) == len(notes), starts
    requested = (np.array([t for _, t in notes]) - notes[0][1]) * SR
    assert (np.array(starts) - starts[0]).tolist() == pytest.approx(requested.tolist(), abs=BLOCK)
    assert_pitches(audio, starts, [p for p, _ in notes])


# ------------------------------------------------------------------------------------------------------- Pd
def pd_harness(path: Path, port: int, events: list[tuple[int, str]], quit_ms: int) -> None:
    """A headless patch: at each (ms, message) send the message to [pgesam-osc], print the replies, quit."""
    lines, conns = ["#N canvas 0 0 800 600 12;", "#X obj 10 10 loadbang;",
                    f"#X obj 10 500 pgesam-osc 127.0.0.1 {port};", "#X obj 10 540 print pgesam-reply;"], []
    conns.append("#X connect 1 1 2 0;")
    for i, (ms, message) in enumerate([*events, (quit_ms, "\\; pd quit")]):
        lines += [f"#X obj {10 + 130 * (i % 6)} {40 + 90 * (i // 6)} delay {ms};",
                  f"#X msg {10 + 130 * (i % 6)} {70 + 90 * (i // 6)} {message};"]
        d = 3 + 2 * i
        conns += [f"#X connect 0 0 {d} 0;", f"#X connect {d} 0 {d + 1} 0;"]
        if i < len(events):
            conns.append(f"#X connect {d + 1} 0 1 0;")
    path.write_text("\n".join(lines + conns) + "\n")


@needs("pd", "puredata-core")
def test_pd_abstraction_sends_notes_and_shows_replies(server: tuple, tmp_path: Path) -> None:
    proc, port, wav = server
    harness = tmp_path / "harness.pd"
    pd_harness(harness, port, [(0, "ping"), (0, "timbre -0.75 -0.5"), (1500, "note 60 100"), (1800, "note_off 60"),
                               (2100, "note 64 100"), (2400, "note 64 0"), (2700, "note 67 100 -0.75 -0.5"),
                               (3000, "all_off"), (3300, "status")], quit_ms=3700)
    r = subprocess.run(["pd", "-nogui", "-noaudio", "-nomidi", "-stderr", "-path", str(EXAMPLES / "pd"),
                        str(harness)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert re.search(r"^error|couldn't create", log, re.M) is None, log
    assert "pgesam-reply: pong" in log and "pgesam-reply: timbre -0.75 -0.5 0" in log, log
    status = re.search(r"^pgesam-reply: status (.*)$", log, re.M).group(1).split()
    assert status[status.index("late") + 1] == "0" and status[status.index("provider") + 1] == "CPUExecutionProvider"

    audio = stop_and_record(proc, wav)
    starts = onsets(audio)
    assert len(starts) == 3, starts
    # immediate messages, timed by Pd's scheduler and the engine's arrival stamps: within a few blocks
    assert np.diff(starts).tolist() == pytest.approx([0.6 * SR, 0.6 * SR], abs=6 * BLOCK)
    assert_pitches(audio, starts, [60, 64, 67])


# ------------------------------------------------------------------------------------------- liblo tools
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Liblo:
    """oscsend sends through a relay socket; the engine replies to that socket, which hands the replies unchanged
    to oscdump; `expect` reads oscdump's lines (`TIMETAG ADDRESS TYPES ARGS...`)."""

    def __init__(self, engine: tuple[str, int]):
        self.engine, self.dump_port = engine, free_udp_port()
        self.dump = subprocess.Popen(["oscdump", "-L", str(self.dump_port)], stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.rstrip("\n")) for x in self.dump.stdout],
                         daemon=True).start()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        threading.Thread(target=self._relay, daemon=True).start()
        self.replies: dict[str, list[str]] = {}  # address -> [types, args] of its first reply

    def _relay(self) -> None:
        while not self.stop.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
                self.sock.sendto(data, ("127.0.0.1", self.dump_port) if sender[:2] == self.engine else self.engine)
            except OSError:  # the timeout, or an ICMP "port unreachable" from an earlier datagram
                continue

    def send(self, address: str, types: str, values: list[str]) -> None:
        subprocess.run(["oscsend", "127.0.0.1", str(self.sock.getsockname()[1]), address, types, *values],
                       check=True, timeout=10)

    def expect(self, address: str, timeout: float = 30.0) -> list[str]:
        end = time.time() + timeout
        while address not in self.replies and time.time() < end:
            try:
                _, addr, rest = (self.lines.get(timeout=0.2) + " ").split(" ", 2)
                self.replies.setdefault(addr, rest.strip().split(" ", 1))
            except queue.Empty:
                pass
        assert address in self.replies, f"oscdump never printed {address}; got {sorted(self.replies)}"
        return self.replies[address]

    def close(self) -> None:
        self.stop.set()
        self.dump.terminate()
        self.dump.wait(timeout=10)
        self.sock.close()


def liblo_plan(render_path: str) -> list[tuple[str, list[str], str | None]]:
    """(address, values, expected reply) for every address of the engine, notes included; types come from ROUTES."""
    return [("/pgesam/ping", [], "/pgesam/pong"), ("/pgesam/map", [], "/pgesam/instrument"),
            ("/pgesam/timbre", ["-0.75", "-0.5"], "/pgesam/timbre"), ("/pgesam/status", [], "/pgesam/status"),
            ("/pgesam/note", ["60", "100"], None), ("/pgesam/note_off", ["60"], None),
            ("/pgesam/note", ["64", "100", "-0.75", "-0.5"], None), ("/pgesam/all_off", [], None),
            ("/pgesam/render", ["0.5", "0.5", "67", render_path], "/pgesam/rendered"),
            ("/pgesam/encode", [render_path], "/pgesam/encoded")]


def types_of(address: str, n_values: int) -> str:
    """The OSC type tags the engine's routing table declares for the first `n_values` arguments of `address`."""
    route = ROUTES[address]
    return "".join(OSC_TYPE[kind] for _, kind in (route.params + route.optional)[:n_values])


@needs("oscsend", "liblo-tools")
@needs("oscdump", "liblo-tools")
def test_liblo_oscsend_every_address_and_oscdump_gets_the_replies(server: tuple, tmp_path: Path) -> None:
    proc, port, wav = server
    liblo, client = Liblo(("127.0.0.1", port)), OscClient("127.0.0.1", port)
    try:
        for address, values, reply in liblo_plan("liblo-note.wav"):  # in serve's --out-dir and --in-dir
            liblo.send(address, types_of(address, len(values)), values)
            if reply is not None:
                liblo.expect(reply)
            if address == "/pgesam/timbre":
                wait_prerendered(client)
            if address in ("/pgesam/note", "/pgesam/note_off"):
                time.sleep(0.3)
        assert {a for a, _, _ in liblo_plan("")} == set(ROUTES), "liblo_plan must send every address of the engine"
        assert ERROR not in liblo.replies, liblo.replies[ERROR]
        assert liblo.expect("/pgesam/timbre") == ["ffi", "-0.750000 -0.500000 0"]
        assert liblo.expect("/pgesam/map")[0] == "ifffff"  # count, radius, x range, y range
        assert liblo.expect("/pgesam/instrument") == ["issff",
                                                      '0 "keyboard_acoustic_000" "keyboard" 0.100000 -0.400000']
        assert liblo.expect("/pgesam/rendered") == ["s", f'"{tmp_path.resolve() / "liblo-note.wav"}"']
        types, args = liblo.expect("/pgesam/encoded")
        assert types == "ffsi" and args.endswith(" 67")  # the rendered note's pitch, found again
        assert liblo.expect("/pgesam/pong") == [""] and liblo.expect("/pgesam/status")[0].startswith("ssss")
    finally:
        client.close()
        liblo.close()
    audio = stop_and_record(proc, wav)
    starts = onsets(audio)
    assert len(starts) == 2, starts
    assert_pitches(audio, starts, [60, 64])


# ------------------------------------------------------------------------------------ Max/MSP and Pd, static
def reply_addresses() -> set[str]:
    """The addresses the engine replies with, read from its routing table's descriptions."""
    return {a for r in ROUTES.values() for a in re.findall(r"/pgesam/\w+", r.doc.split("Replies", 1)[-1])} | {ERROR}


def check_message(address: str, types: str, whole_floats: bool = False) -> None:
    """`address` with OSC `types` must fit a route: its argument count, and i/f for numbers, s for strings.
    `whole_floats`: the sender's numbers are all floats (Pd) and whole where a whole number is needed."""
    assert address in ROUTES, f"{address} is not in the engine's address space"
    route = ROUTES[address]
    n, n_opt = len(route.params), len(route.optional)
    assert len(types) in {n, n + n_opt}, f"{address} {types}: usage {route.usage}"
    for (name, kind), t in zip(route.params + route.optional, types):
        allowed = {float: "if", int: "if" if whole_floats else "i", str: "s"}[kind]
        assert t in allowed, f"{address}: {name} sent as {t}, needs one of {allowed}"


MAX_SOURCE_TYPES = {"kslider": "i", "number": "i", "flonum": "f", "notein": "i", "opendialog": "s",
                    "conformpath": "s"}


def max_source_type(box: dict) -> str:
    """The OSC type of what a Max box (not a [pack]) sends into a message's $1."""
    kind = box["maxclass"] if box["maxclass"] != "newobj" else box["text"].split()[0]
    assert kind in MAX_SOURCE_TYPES, f"unknown source {kind} for a $-argument"
    return MAX_SOURCE_TYPES[kind]


def max_arg_types(box: dict, source: dict | None) -> str:
    """OSC types of a Max message box's arguments: literals by their spelling, $N from the [pack]/[pak] or box
    that feeds the message."""
    types = ""
    for token in box["text"].split()[1:]:
        if token.startswith("$"):
            assert source is not None, f"{box['text']!r} has $-arguments but nothing feeds it"
            words = source.get("text", "").split()
            if words and words[0] in ("pack", "pak"):
                arg = words[int(token[1:])]
                types += "f" if "." in arg else ("i" if re.fullmatch(r"-?\d+", arg) else "s")
            else:
                types += max_source_type(source)
        elif re.fullmatch(r"-?\d+", token):
            types += "i"
        elif re.fullmatch(r"-?\d*\.\d*(e-?\d+)?", token):
            types += "f"
        else:
            types += "s"
    return types


def test_max_patch_is_valid_and_sends_only_what_the_engine_understands() -> None:
    patch = json.loads((EXAMPLES / "max" / "pgesam-client.maxpat").read_text())["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patch["boxes"]}
    feeds: dict[str, list[dict]] = {}
    for line in patch["lines"]:
        (src, out), (dst, inlet) = line["patchline"]["source"], line["patchline"]["destination"]
        assert src in boxes and dst in boxes, line
        assert out < boxes[src]["numoutlets"] and inlet < boxes[dst]["numinlets"], line
        feeds.setdefault(dst, []).append(boxes[src])
    [send] = [i for i, b in boxes.items() if b.get("text", "").startswith("udpsend ")]
    assert boxes[send]["text"] == "udpsend 127.0.0.1 57130"
    sent = set()
    for box in feeds[send]:
        assert box["maxclass"] == "message", box
        address = box["text"].split()[0]
        sources = feeds.get(box["id"], [None])
        for source in sources:
            check_message(address, max_arg_types(box, source))
        sent.add(address)
    assert {"/pgesam/timbre", "/pgesam/note", "/pgesam/note_off", "/pgesam/status", "/pgesam/encode"} <= sent
    [receive] = [b for b in boxes.values() if b.get("text", "").startswith("udpreceive ")]
    [route] = [b for b in boxes.values() if b.get("text", "").startswith("route /pgesam/")]
    assert set(route["text"].split()[1:]) <= reply_addresses() and receive["id"] in {
        s["id"] for s in feeds[route["id"]]}


def test_pd_client_patch_sends_only_what_the_engine_understands() -> None:
    """The GUI patch (no headless run can click it): every message into [pgesam-osc] is a known address."""
    patch = (EXAMPLES / "pd" / "pgesam-client.pd").read_text()
    records = [(k, t) for k, t in re.findall(r"^#X (\w+) [-\d]+ [-\d]+ ?(.*?);$", patch, re.M | re.S)
               if k != "connect"]  # objects, messages, comments, numbers: numbered in file order from 0
    kinds, texts = [k for k, _ in records], [t.replace("\\$", "$") for _, t in records]
    connections = [(int(a), int(b)) for a, b in re.findall(r"^#X connect (\d+) \d+ (\d+) \d+;$", patch, re.M)]
    [osc] = [i for i, text in enumerate(texts) if text.startswith("pgesam-osc ")]
    selectors = set()
    for msg in {src for src, dst in connections if dst == osc}:
        assert kinds[msg] == "msg", texts[msg]
        words = texts[msg].split()
        symbols_in = any(texts[src].startswith("openpanel") for src, dst in connections if dst == msg)
        types = "".join("f" if re.fullmatch(r"-?[\d.]+", w) or w.startswith("$") and not symbols_in else "s"
                        for w in words[1:])
        check_message(f"/pgesam/{words[0]}", types, whole_floats=True)  # Pd sends every number as a float
        selectors.add(words[0])
    assert {"timbre", "note", "note_off", "status", "encode"} <= selectors
