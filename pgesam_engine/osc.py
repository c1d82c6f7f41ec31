"""OSC control: the address space, argument checking, routing to engine methods, and a UDP server.

Routing is separate from networking (python-osc habit): `Router.dispatch(address, args, at, arrival)` calls a
plain `Engine` method and returns the replies, with no socket involved; `OscServer` only receives datagrams,
parses them (bundles and their timetags included), routes, and sends replies back to the sender.
Timetags are NOT waited for here: note messages pass theirs to the engine, which schedules them on the audio
clock. Slow requests (render, encode) run on a worker thread so that notes keep flowing meanwhile.
Malformed or out-of-range messages are answered with `/pgesam/error <message>`; the server keeps serving.
"""
from __future__ import annotations

import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.parsing import osc_types

from .engine import Engine

log = logging.getLogger("pgesam.osc")
ERROR = "/pgesam/error"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 57130
Reply = tuple[str, list]
Handler = Callable[[Engine, dict, "float | None", float], list[Reply]]


class OscArgError(ValueError):
    """A message whose arguments do not fit its address."""


@dataclass(frozen=True)
class Route:
    """An address: its required and optional (all or none) parameters as (name, type), and its handler."""
    address: str
    params: tuple[tuple[str, type], ...]
    handler: Handler
    optional: tuple[tuple[str, type], ...] = ()
    slow: bool = False
    doc: str = ""

    @property
    def usage(self) -> str:
        opt = f" [{' '.join(n for n, _ in self.optional)}]" if self.optional else ""
        return f"{self.address} {' '.join(n for n, _ in self.params)}{opt}".strip()


def _convert(name: str, kind: type, value: object) -> object:
    if kind is str:
        if not isinstance(value, str):
            raise OscArgError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OscArgError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if not float(value).is_integer():
            raise OscArgError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def parse_args(route: Route, args: list) -> dict:
    """Message arguments -> {name: value} checked against the route; OscArgError with the usage if they differ."""
    n, n_opt = len(route.params), len(route.optional)
    if len(args) not in ((n, n + n_opt) if n_opt else (n,)):
        raise OscArgError(f"{route.address} takes {n}{f' or {n + n_opt}' if n_opt else ''} arguments, "
                          f"got {len(args)}; usage: {route.usage}")
    specs = route.params + route.optional
    return {name: _convert(name, kind, value) for (name, kind), value in zip(specs, args)}


def _timbre(e: Engine, a: dict, at: float | None, arrival: float) -> list[Reply]:
    x, y, moved = e.set_timbre(a["x"], a["y"])
    return [("/pgesam/timbre", [x, y, int(moved)])]


def _note(e: Engine, a: dict, at: float | None, arrival: float) -> list[Reply]:
    x, y, moved = e.note(a["pitch"], a["velocity"], a.get("x"), a.get("y"), at, arrival)
    return [("/pgesam/clamped", [x, y])] if moved else []


def _status(e: Engine, a: dict, at: float | None, arrival: float) -> list[Reply]:
    flat: list = []
    for k, v in e.status().items():
        flat += [k, v if isinstance(v, (int, float, str)) else str(v)]
    return [("/pgesam/status", flat)]


def _map(e: Engine, a: dict, at: float | None, arrival: float) -> list[Reply]:
    m = e.synth.m.map
    insts = e.instruments()
    head = ("/pgesam/map", [len(insts), m.radius, *m.x_range, *m.y_range])
    return [head] + [("/pgesam/instrument", [i, d["name"], d.get("family", ""), float(d["x"]), float(d["y"])])
                     for i, d in enumerate(insts)]


def _encode(e: Engine, a: dict, at: float | None, arrival: float) -> list[Reply]:
    enc = e.encode_file(a["path"])
    name = enc.nearest[0][0]["name"] if enc.nearest else ""
    return [("/pgesam/encoded", [enc.x, enc.y, name, enc.pitch])]


ROUTES = {r.address: r for r in [
    Route("/pgesam/timbre", (("x", float), ("y", float)), _timbre,
          doc="set the current timbre point; prerenders its pitches. Replies /pgesam/timbre x y clamped"),
    Route("/pgesam/note", (("pitch", int), ("velocity", float)), _note, (("x", float), ("y", float)),
          doc="note on (velocity 0 = note off), on the current timbre or on x y; timetag honoured. "
              "Replies /pgesam/clamped x y only when the point was moved onto the map"),
    Route("/pgesam/note_off", (("pitch", int),), lambda e, a, at, t: e.note_off(a["pitch"], at, t) or [],
          doc="release the note; timetag honoured"),
    Route("/pgesam/all_off", (), lambda e, a, at, t: e.all_off(at, t) or [],
          doc="release every voice; timetag honoured"),
    Route("/pgesam/render", (("x", float), ("y", float), ("pitch", int), ("path", str)),
          lambda e, a, at, t: [("/pgesam/rendered", [e.render_note(a["x"], a["y"], a["pitch"], a["path"])])],
          slow=True, doc="write one note to a WAV file. Replies /pgesam/rendered path"),
    Route("/pgesam/encode", (("path", str),), _encode, slow=True,
          doc="place an audio file on the map. Replies /pgesam/encoded x y nearest_name pitch"),
    Route("/pgesam/map", (), _map,
          doc="Replies /pgesam/map count radius xmin xmax ymin ymax, then /pgesam/instrument i name family x y"),
    Route("/pgesam/status", (), _status, doc="Replies /pgesam/status key value key value ..."),
    Route("/pgesam/ping", (), lambda e, a, at, t: [("/pgesam/pong", [])], doc="Replies /pgesam/pong"),
]}


class Router:
    """Address -> engine call. `dispatch` never raises: errors become an /pgesam/error reply and a log line."""

    def __init__(self, engine: Engine, routes: dict[str, Route] = ROUTES):
        self.engine, self.routes = engine, routes
        self.errors = 0

    def is_slow(self, address: str) -> bool:
        route = self.routes.get(address)
        return route is not None and route.slow

    def dispatch(self, address: str, args: list, at: float | None = None,
                 arrival: float | None = None) -> list[Reply]:
        """Run the handler of `address` with `args`; `at` = timetag (None: immediate), `arrival` = receive time."""
        arrival = time.time() if arrival is None else arrival
        route = self.routes.get(address)
        try:
            if route is None:
                raise OscArgError(f"unknown address {address}; known: {', '.join(self.routes)}")
            return route.handler(self.engine, parse_args(route, list(args)), at, arrival)
        except ValueError as e:  # OscArgError, EngineError, SynthError: the sender's mistake
            return self._error(address, str(e))
        except Exception as e:  # anything else: log it in full, tell the sender, keep serving
            log.exception("handler for %s failed", address)
            return self._error(address, f"{type(e).__name__}: {e}")

    def _error(self, address: str, message: str) -> list[Reply]:
        self.errors += 1
        log.warning("%s: %s", address, message)
        return [(ERROR, [message])]


def parse_packet(data: bytes) -> list[tuple[str, list, float | None]]:
    """A datagram -> [(address, args, timetag)], timetag in time.time() seconds or None for immediate.

    Nested bundles use their own timetag. Raises ValueError for a datagram that is not OSC.
    """
    try:
        if OscBundle.dgram_is_bundle(data):
            return _walk(OscBundle(data))
        if OscMessage.dgram_is_message(data):
            msg = OscMessage(data)
            return [(msg.address, list(msg.params), None)]
    except Exception as e:  # python-osc raises its own ParseError types and IndexError
        raise ValueError(f"malformed OSC packet ({len(data)} bytes): {e}") from e
    raise ValueError(f"not an OSC packet ({len(data)} bytes)")


def _walk(bundle: OscBundle) -> list[tuple[str, list, float | None]]:
    at = None if bundle.timestamp == osc_types.IMMEDIATELY else float(bundle.timestamp)
    out = []
    for content in bundle:
        if isinstance(content, OscBundle):
            out.extend(_walk(content))
        else:
            out.append((content.address, list(content.params), at))
    return out


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)


def _enable_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram's arrival (Linux SO_TIMESTAMPNS, CLOCK_REALTIME)."""
    if SO_TIMESTAMPNS is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


def build(address: str, args: list) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(float(a) if isinstance(a, float) else a)
    return b.build().dgram


class OscServer:
    """UDP OSC server: receive, parse, route, reply to the sender. `start()` runs it on a thread."""

    def __init__(self, router: Router, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        self.router = router
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from e
        self.sock.settimeout(0.2)
        self._kernel_stamps = _enable_timestamps(self.sock)
        self._slow = ThreadPoolExecutor(1, thread_name_prefix="pgesam-osc-slow")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.packets = self.bad_packets = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender, arrival = self._receive()
            except socket.timeout:
                continue
            except OSError:  # e.g. ICMP port unreachable from an earlier reply; or the socket was closed
                if self._stop.is_set():
                    break
                continue
            self.handle(data, sender, arrival)

    def _receive(self) -> tuple[bytes, tuple, float]:
        """One datagram, its sender, and its arrival time: the kernel's receive stamp where there is one, so
        that a late wake-up of this thread does not move the note."""
        if not self._kernel_stamps:
            data, sender = self.sock.recvfrom(65536)
            return data, sender, time.time()
        data, anc, _, sender = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                return data, sender, sec + nsec * 1e-9
        return data, sender, time.time()

    def handle(self, data: bytes, sender: tuple, arrival: float) -> None:
        self.packets += 1
        try:
            messages = parse_packet(data)
        except ValueError as e:
            self.bad_packets += 1
            log.warning("from %s: %s", sender, e)
            self.send(sender, [(ERROR, [str(e)])])
            return
        for address, args, at in messages:
            if self.router.is_slow(address):
                self._slow.submit(lambda a=address, g=args: self.send(sender, self.router.dispatch(a, g)))
            else:
                self.send(sender, self.router.dispatch(address, args, at, arrival))

    def send(self, to: tuple, replies: list[Reply]) -> None:
        for address, args in replies:
            try:
                self.sock.sendto(build(address, args), to)
            except Exception as e:  # an unreachable sender must not stop the server
                log.warning("cannot reply %s to %s: %s", address, to, e)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="pgesam-osc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._slow.shutdown(wait=True, cancel_futures=True)
        self.sock.close()


def address_table() -> str:
    """The address space as a Markdown table (for the README)."""
    rows = ["| address | arguments | what |", "|---|---|---|"]
    for r in ROUTES.values():
        args = " ".join(n for n, _ in r.params) + (f" [{' '.join(n for n, _ in r.optional)}]" if r.optional else "")
        rows.append(f"| `{r.address}` | {args} | {r.doc} |")
    return "\n".join(rows)
