"""OSC control: the address space, argument checking, routing to engine methods, and a UDP server.

Routing is separate from networking (python-osc habit): `Router.dispatch(address, args, at, arrival)` calls a
plain `Engine` method and returns the replies, with no socket involved; `OscServer` only receives datagrams,
parses them (bundles and their timetags included), routes, and sends replies back to the sender.
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

import ipaddress
import logging
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


class RemoteRefused(ValueError):
    """Listening on an address other machines can reach, without saying so."""


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


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40 if sys.platform == "linux" else None)


def _enable_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram's arrival (Linux SO_TIMESTAMPNS, CLOCK_REALTIME)."""
    if SO_TIMESTAMPNS is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


def _enable_drop_count(sock: socket.socket) -> bool:
    """Ask the kernel to report, with each datagram, how many it dropped on this socket (Linux SO_RXQ_OVFL)."""
    if SO_RXQ_OVFL is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        return True
    except OSError:
        return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text.split("%")[0])
    return addr.ipv4_mapped if getattr(addr, "ipv4_mapped", None) else addr


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) can only be reached from this machine."""
    try:
        return _ip(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(_ip(info[4][0]).is_loopback for info in infos)


def parse_allow(spec: str | Iterable[str] | None) -> tuple | None:
    """'127.0.0.2, 192.168.1.0/24, studio-mac' -> networks; None (or empty) -> None: every sender."""
    if spec is None:
        return None
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    nets: list = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        try:
            nets += [ipaddress.ip_network(_ip(i[4][0])) for i in socket.getaddrinfo(item, None, type=socket.SOCK_DGRAM)]
        except (socket.gaierror, ValueError):
            raise ValueError(f"--allow: {item!r} is not an address, a network (192.168.1.0/24) or a known host name")
    return tuple(nets) or None


def build(address: str, args: list) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(float(a) if isinstance(a, float) else a)
    return b.build().dgram


class OscServer:
    """UDP OSC server: receive, parse, route, reply to the sender. `start()` runs it on a thread."""

    def __init__(self, router: Router, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, allow_remote: bool = False,
                 allow: str | Iterable[str] | None = None, limits: OscLimits | None = None,
                 warn: Callable[[str], None] | None = None, reply_port: int | None = None):
        """`reply_port`: send replies to this port of the sender's host instead of the port the message came
        from (Max's [udpsend] sends from a port nobody listens on; its [udpreceive N] listens on N)."""
        remote = not is_loopback(host)
        if remote and not allow_remote:
            raise RemoteRefused(f"refusing to listen on {host}: other machines could reach it; pass --allow-remote "
                                "(and --allow ADDRESSES to name who may send) or use --host 127.0.0.1")
        self.router = router
        self.reply_port = reply_port
        self.limits = limits or router.limits
        self.allow = parse_allow(allow)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from e
        self.sock.settimeout(0.2)
        self._kernel_stamps = _enable_timestamps(self.sock)
        self._drop_count = _enable_drop_count(self.sock)
        self._ancsize = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
        self._slow = ThreadPoolExecutor(1, thread_name_prefix="pgesam-osc-slow")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple, TokenBucket] = OrderedDict()
        self._all_errors = TokenBucket(self.limits.total_error_rate, self.limits.total_error_rate)
        self._allowed_ips: dict[str, bool] = {}
        self.packets = self.bad_packets = self.messages = self.denied = 0
        self.error_replies = self.errors_suppressed = self.kernel_dropped = 0
        self.slow_pending = self.slow_dropped = 0
        if remote:
            who = ", ".join(map(str, self.allow)) if self.allow else "ANY address"
            (warn or log.warning)(f"listening on {host}:{self.address[1]}, reachable from other machines; accepting "
                                  f"OSC from {who}. Senders can play, render into the output folder and read the "
                                  "input folder" + ("" if self.allow else "; restrict them with --allow"))
        if hasattr(router.engine, "status_sources"):
            router.engine.status_sources.append(self.counters)

    def counters(self) -> dict:
        """The server's part of /pgesam/status."""
        return {"packets": self.packets, "bad_packets": self.bad_packets, "messages": self.messages,
                "denied": self.denied, "kernel_dropped": self.kernel_dropped, "errors": self.router.errors,
                "error_replies": self.error_replies, "errors_suppressed": self.errors_suppressed,
                "log_suppressed": self.router.log_suppressed, "clients": len(self._buckets),
                "slow_pending": self.slow_pending, "slow_dropped": self.slow_dropped,
                "allow": ",".join(map(str, self.allow)) if self.allow else "any"}

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
        that a late wake-up of this thread does not move the note. Also reads the kernel's drop count."""
        if not (self._kernel_stamps or self._drop_count):
            data, sender = self.sock.recvfrom(65536)
            return data, sender, time.time()
        data, anc, _, sender = self.sock.recvmsg(65536, self._ancsize)
        arrival = None
        for level, kind, cdata in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                arrival = sec + nsec * 1e-9
            elif kind == SO_RXQ_OVFL and len(cdata) >= 4:
                self.kernel_dropped = max(self.kernel_dropped, struct.unpack("I", cdata[:4])[0])
        return data, sender, time.time() if arrival is None else arrival

    def _allowed(self, ip: str) -> bool:
        ok = self._allowed_ips.get(ip)
        if ok is None:
            try:
                addr = _ip(ip)
                ok = any(addr in net for net in self.allow)
            except ValueError:
                ok = False
            if len(self._allowed_ips) >= 4096:
                self._allowed_ips.clear()
            self._allowed_ips[ip] = ok
        return ok

    def handle(self, data: bytes, sender: tuple, arrival: float) -> None:
        self.packets += 1
        if self.allow is not None and not self._allowed(sender[0]):
            self.denied += 1  # not answered: a stranger learns nothing, not even that we listen
            return
        try:
            messages = parse_packet(data, self.limits.max_messages, self.limits.max_depth)
        except ValueError as e:
            self.bad_packets += 1
            self.router.warn("from %s: %s", sender, str(e))  # a string: a kept record must not pin the datagram
            self.send(sender, [(ERROR, [str(e)])])
            return
        for address, args, at in messages:
            self.messages += 1
            if self.router.is_slow(address):
                self._submit_slow(address, args, sender)
            else:
                self.send(sender, self.router.dispatch(address, args, at, arrival))

    def _submit_slow(self, address: str, args: list, sender: tuple) -> None:
        with self._lock:
            full = self.slow_pending >= self.limits.max_slow_pending
            if not full:
                self.slow_pending += 1
        if full:
            self.slow_dropped += 1
            self.send(sender, self.router._error(address, f"busy: {self.slow_pending} render/encode requests are "
                                                          "waiting already; send this one again later"))
            return
        self._slow.submit(self._run_slow, address, args, sender)

    def _run_slow(self, address: str, args: list, sender: tuple) -> None:
        try:
            replies = self.router.dispatch(address, args)
        finally:
            with self._lock:
                self.slow_pending -= 1
        self.send(sender, replies)

    def _may_send_error(self, to: tuple) -> bool:
        """The error-reply budget of `to` (address, port) and of all clients together."""
        key = tuple(to[:2])
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.limits.error_rate, self.limits.error_burst)
                while len(self._buckets) > self.limits.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.take() and self._all_errors.take()

    def send(self, to: tuple, replies: list[Reply]) -> None:
        if self.reply_port:
            to = (to[0], self.reply_port, *to[2:])
        for address, args in replies:
            if address == ERROR:
                if not self._may_send_error(to):
                    self.errors_suppressed += 1
                    continue
                self.error_replies += 1
            try:
                self.sock.sendto(build(address, args), to)
            except Exception as e:  # an unreachable sender must not stop the server
                self.router.warn("cannot reply %s to %s: %s", address, to, e)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="pgesam-osc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._slow.shutdown(wait=True, cancel_futures=True)
        self.sock.close()
        sources = getattr(self.router.engine, "status_sources", [])
        if self.counters in sources:
            sources.remove(self.counters)


def address_table() -> str:
    """The address space as a Markdown table (for the README)."""
    rows = ["| address | arguments | what |", "|---|---|---|"]
    for r in ROUTES.values():
        args = " ".join(n for n, _ in r.params) + (f" [{' '.join(n for n, _ in r.optional)}]" if r.optional else "")
        rows.append(f"| `{r.address}` | {args} | {r.doc} |")
    return "\n".join(rows)
