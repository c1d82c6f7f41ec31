"""OSC control: the address space, argument checking, packet parsing and routing to engine methods.

Routing is separate from networking (python-osc habit): `Router.dispatch(address, args, at, arrival)` calls a
plain `Engine` method and returns the replies, with no socket involved; `osc_server.OscServer` only receives
datagrams, parses them here (bundles and their timetags included), routes, and sends replies back to the sender.
Timetags are NOT waited for here: note messages pass theirs to the engine, which schedules them on the audio
clock. Slow requests (render, encode) run on a worker thread so that notes keep flowing meanwhile.
Malformed or out-of-range messages are answered with `/pgesam/error <message>`; the server keeps serving.

Exposure and floods (limits in `OscLimits`, every refusal counted in /pgesam/status):
    binding         loopback only unless `allow_remote`; `allow` (addresses or networks) drops other senders
    error replies   a token bucket per client (address, port) and one for all: 10/s with bursts of 20 per client,
                    100/s overall; errors past that are counted (`errors_suppressed`), not sent; log lines too
    datagrams       at most 1024 messages and 8 nested bundles each; what the kernel drops when the socket
                    buffer is full is counted (`kernel_dropped`, Linux SO_RXQ_OVFL)
    render/encode   at most 4 at a time (running or waiting); more are refused at once with an error
"""
from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.parsing import osc_types

from .engine import Engine

log = logging.getLogger("pgesam.osc")
ERROR = "/pgesam/error"
Reply = tuple[str, list]
Handler = Callable[[Engine, dict, "float | None", float], list[Reply]]


class OscArgError(ValueError):
    """A message whose arguments do not fit its address."""


@dataclass(frozen=True)
class OscLimits:
    """How much the server accepts and answers. Rates are per second."""
    error_rate: float = 10.0  # /pgesam/error replies to one client (address, port)
    error_burst: float = 20.0
    total_error_rate: float = 100.0  # /pgesam/error replies to all clients together
    log_rate: float = 2.0  # warning lines in the log, all clients together
    log_burst: float = 20.0
    max_clients: int = 1024  # clients whose error budget is remembered (the least recent is forgotten)
    max_slow_pending: int = 4  # render/encode requests running or waiting; more are refused
    max_messages: int = 1024  # messages in one datagram
    max_depth: int = 8  # nested bundles in one datagram
    error_chars: int = 300  # an error message is cut to this length


class TokenBucket:
    """`rate` events per second with bursts of `burst`: `take()` says whether one more may happen now."""
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


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


def _describe(value: object) -> str:
    """A short description of an argument for an error message (a 60 kB blob is not echoed back)."""
    if isinstance(value, (bytes, bytearray)):
        return f"a blob of {len(value)} bytes"
    if isinstance(value, (str, list)) and len(value) > 40:
        return f"a {type(value).__name__} of {len(value)} {'characters' if isinstance(value, str) else 'items'}"
    return repr(value)


def _convert(name: str, kind: type, value: object) -> object:
    if kind is str:
        if not isinstance(value, str):
            raise OscArgError(f"{name} must be a string, got {_describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OscArgError(f"{name} must be a number, got {_describe(value)}")
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
          doc="release every voice; timetag honoured. Without one it also cancels everything sent before it"),
    Route("/pgesam/render", (("x", float), ("y", float), ("pitch", int), ("path", str)),
          lambda e, a, at, t: [("/pgesam/rendered", [e.render_note(a["x"], a["y"], a["pitch"], a["path"])])],
          slow=True, doc="write one note to a WAV file (inside serve --out-dir). Replies /pgesam/rendered path"),
    Route("/pgesam/encode", (("path", str),), _encode, slow=True,
          doc="place an audio file (inside serve --in-dir) on the map. Replies /pgesam/encoded x y nearest_name "
              "pitch"),
    Route("/pgesam/map", (), _map,
          doc="Replies /pgesam/map count radius xmin xmax ymin ymax, then /pgesam/instrument i name family x y"),
    Route("/pgesam/status", (), _status, doc="Replies /pgesam/status key value key value ..."),
    Route("/pgesam/ping", (), lambda e, a, at, t: [("/pgesam/pong", [])], doc="Replies /pgesam/pong"),
]}


class Router:
    """Address -> engine call. `dispatch` never raises: errors become an /pgesam/error reply and a log line."""

    def __init__(self, engine: Engine, routes: dict[str, Route] = ROUTES, limits: OscLimits | None = None):
        self.engine, self.routes = engine, routes
        self.limits = limits or OscLimits()
        self.errors = self.log_suppressed = 0
        self._log = TokenBucket(self.limits.log_rate, self.limits.log_burst)

    def warn(self, message: str, *args: object, exc_info: bool = False) -> None:
        """A warning line, unless the log rate is spent (then only counted: floods do not flood the log)."""
        if self._log.take():
            log.warning(message, *args, exc_info=exc_info)
        else:
            self.log_suppressed += 1

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
                raise OscArgError(f"unknown address {_clip(str(address))}; known: {', '.join(self.routes)}")
            return route.handler(self.engine, parse_args(route, list(args)), at, arrival)
        except (ValueError, OSError) as e:  # OscArgError, EngineError, SynthError, a bad path: the sender's mistake
            return self._error(address, str(e))
        except Exception as e:  # anything else: log it in full, tell the sender, keep serving
            self.warn("handler for %s failed", _clip(str(address)), exc_info=True)
            return self._error(address, f"{type(e).__name__}: {e}")

    def _error(self, address: str, message: str) -> list[Reply]:
        self.errors += 1
        message = _clip(message, self.limits.error_chars)
        self.warn("%s: %s", _clip(str(address)), message)
        return [(ERROR, [message])]


def parse_packet(data: bytes, max_messages: int = 1024,
                 max_depth: int = 8) -> list[tuple[str, list, float | None]]:
    """A datagram -> [(address, args, timetag)], timetag in time.time() seconds or None for immediate.

    Nested bundles use their own timetag. Raises ValueError for a datagram that is not OSC, or that holds more
    than `max_messages` messages or bundles nested deeper than `max_depth`. Bundles are walked here, not by
    python-osc, whose walker loops forever on a negative element size.
    """
    try:
        if data.startswith(_BUNDLE):
            out: list = []
            _walk(data, out, 1, max_depth, max_messages)
            return out
        if data[:1] == b"/":
            msg = _message(data)
            return [(msg.address, list(msg.params), None)]
    except Exception as e:  # ours (OscArgError), python-osc's ParseError types, IndexError, UnicodeDecodeError
        raise ValueError(f"malformed OSC packet ({len(data)} bytes): {_clip(str(e))}") from e
    raise ValueError(f"not an OSC packet ({len(data)} bytes)")


_BUNDLE = b"#bundle\0"
_TYPE_TAGS = frozenset("ihfdsbrmtTFN[]")  # what python-osc decodes; it skips others with a root-logger warning


def _message(data: bytes) -> OscMessage:
    """python-osc's message parser, after refusing type tags it would not decode."""
    end = data.find(b"\0")
    start = (end // 4 + 1) * 4
    if end > 0 and data[start:start + 1] == b",":
        stop = data.find(b"\0", start)
        bad = set(data[start + 1:stop if stop >= 0 else len(data)].decode("latin-1")) - _TYPE_TAGS
        if bad:
            raise OscArgError(f"unsupported OSC type tag(s) {''.join(sorted(bad))!r}")
    return OscMessage(data)


def _walk(data: bytes, out: list, depth: int, max_depth: int, max_messages: int) -> None:
    """Append the messages of bundle `data` (and of the bundles inside it) to `out` as (address, args, at)."""
    if depth > max_depth:
        raise OscArgError(f"bundles nested deeper than {max_depth} are refused")
    if len(data) < 16:
        raise OscArgError(f"bundle of {len(data)} bytes is shorter than its header")
    at_raw, _ = osc_types.get_date(data, 8)
    at = None if at_raw == osc_types.IMMEDIATELY else float(at_raw)
    elements, i = [], 16
    while i < len(data):  # sizes first: a datagram over the limits costs no message parsing
        if len(data) - i < 4:
            raise OscArgError("bundle ends inside an element size")
        (size,) = struct.unpack(">i", data[i:i + 4])
        i += 4
        if size <= 0 or size > len(data) - i:
            raise OscArgError(f"bundle element size {size} does not fit the {len(data) - i} bytes left")
        elements.append(data[i:i + size])
        i += size
    if len(out) + len(elements) > max_messages:
        raise OscArgError(f"a datagram may hold at most {max_messages} messages")
    for content in elements:
        if content.startswith(_BUNDLE):
            _walk(content, out, depth + 1, max_depth, max_messages)
        elif content[:1] == b"/":
            msg = _message(content)
            out.append((msg.address, list(msg.params), at))
        else:
            raise OscArgError("bundle element is neither a message nor a bundle")


def build(address: str, args: list) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(float(a) if isinstance(a, float) else a)
    return b.build().dgram


def address_table() -> str:
    """The address space as a Markdown table (for the README)."""
    rows = ["| address | arguments | what |", "|---|---|---|"]
    for r in ROUTES.values():
        args = " ".join(n for n, _ in r.params) + (f" [{' '.join(n for n, _ in r.optional)}]" if r.optional else "")
        rows.append(f"| `{r.address}` | {args} | {r.doc} |")
    return "\n".join(rows)
