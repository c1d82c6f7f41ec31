"""The OSC UDP server: receive datagrams, parse and route them (`pgesam_engine.osc`), reply to the sender.

Exposure (see `osc.py` for the limits): the server binds loopback unless told `allow_remote`; `allow` (addresses,
networks or host names) drops other senders; `reply_port` sends every reply to that port of the sender's host.
Slow requests (render, encode) run on a worker thread so that notes keep flowing meanwhile.
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

from .osc import ERROR, OscLimits, Reply, Router, TokenBucket, build, parse_packet

log = logging.getLogger("pgesam.osc")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 57130


class RemoteRefused(ValueError):
    """Listening on an address other machines can reach, without saying so."""


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40 if sys.platform == "linux" else None)


def _enable_report(sock: socket.socket, option: int | None) -> bool:
    """Ask the kernel to attach a SOL_SOCKET report to each received datagram (read with recvmsg): SO_TIMESTAMPNS
    stamps its arrival (CLOCK_REALTIME), SO_RXQ_OVFL counts the datagrams dropped on this socket so far. False
    where the platform has neither the option nor recvmsg."""
    if option is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
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
        self._kernel_stamps = _enable_report(self.sock, SO_TIMESTAMPNS)
        self._drop_count = _enable_report(self.sock, SO_RXQ_OVFL)
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
