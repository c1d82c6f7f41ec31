"""Hardening of the OSC server over real loopback UDP: fuzzing, error-reply rate limits, bounded scheduling,
all-notes-off, the allow-list, loopback-only binding, confined file paths and the bounded render queue.

Every loop here is bounded in count and in time; every datagram goes to 127.0.0.0/8.
"""
from __future__ import annotations

import dataclasses
import random
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from engine_fixtures import ask_raw, drain, status_of, tiny_bundle, udp_socket  # noqa: F401 (pytest fixture)
from pythonosc.osc_message_builder import OscMessageBuilder

from pgesam_engine.audio import NullBackend
from pgesam_engine.bundle import Bundle
from pgesam_engine.engine import Engine, EngineConfig
from pgesam_engine.osc import ERROR, OscLimits, Router
from pgesam_engine.osc_server import OscServer, RemoteRefused, is_loopback, parse_allow
from pgesam_engine.synth import Synth

LIMITS = OscLimits(error_rate=10.0, error_burst=20.0)
TIMBRE = (-0.5, -0.5)
NTP_EPOCH = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    eng = Engine(synth, NullBackend(24000, 256),
                 EngineConfig(prerender_default=False, max_pending_events=500, cache_mb=16))
    eng.start()
    eng.set_timbre(*TIMBRE)
    assert eng.prerenderer.wait_idle(120), "prerender did not finish"
    yield eng
    eng.close()


@pytest.fixture
def server(engine: Engine) -> OscServer:
    srv = OscServer(Router(engine, limits=LIMITS), "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------------ raw OSC
def pad(b: bytes) -> bytes:
    return b + b"\0" * (4 - len(b) % 4)


def message(address: bytes, tags: bytes = b"", payload: bytes = b"") -> bytes:
    return pad(address) + pad(b"," + tags) + payload


def bundle(ntp_seconds: float, *elements: bytes) -> bytes:
    tag = 1 if ntp_seconds == 1 else int(ntp_seconds * 2 ** 32)
    return b"#bundle\0" + struct.pack(">Q", tag) + b"".join(struct.pack(">i", len(e)) + e for e in elements)


def ntp(unix: float) -> float:
    return unix + NTP_EPOCH


def note(pitch: int, velocity: float) -> bytes:
    return message(b"/pgesam/note", b"if", struct.pack(">if", pitch, velocity))


def fuzz_packet(rng: random.Random) -> bytes:
    """One malformed or hostile datagram, of one of a dozen kinds."""
    kind = rng.randrange(14)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:  # a truncated message or bundle
        whole = rng.choice([note(60, 100), bundle(1, note(60, 100), note(62, 90))])
        return whole[:rng.randrange(1, len(whole))]
    if kind == 2:  # wrong type tags: strings, blobs, booleans, nil, int64, double, where numbers belong
        tags = rng.choice([b"ss", b"bb", b"TF", b"NN", b"hh", b"dd", b"sf", b"[ii]", b"m", b"c"])
        return message(b"/pgesam/note", tags, rng.randbytes(rng.choice([0, 4, 8, 16])))
    if kind == 3:  # wrong arity
        n = rng.choice([0, 1, 3, 5, 9])
        return message(b"/pgesam/note", b"i" * n, struct.pack(f">{n}i", *[60] * n))
    if kind == 4:  # NaN / inf coordinates
        v = rng.choice([float("nan"), float("inf"), float("-inf")])
        return rng.choice([message(b"/pgesam/timbre", b"ff", struct.pack(">ff", v, 0.0)),
                           message(b"/pgesam/note", b"ffdd", struct.pack(">ffdd", 60, 100, 0.1, v))])
    if kind == 5:  # pitch and velocity out of range
        pitch, vel = rng.choice([(-1, 100), (200, 100), (2 ** 31 - 1, 1), (60, -5), (60, 1000), (60, float("nan"))])
        return message(b"/pgesam/note", b"if", struct.pack(">if", pitch, vel))
    if kind == 6:  # huge string argument or address
        s = pad(b"x" * rng.randrange(1000, 60000))
        return rng.choice([message(b"/pgesam/encode", b"s", s), message(b"/" + s[:-4].rstrip(b"\0"), b"", b"")])
    if kind == 7:  # huge blob
        blob = rng.randbytes(rng.randrange(1000, 60000))
        return message(b"/pgesam/render", b"fffb", struct.pack(">fffi", 0, 0, 60, len(blob)) + pad(blob))
    if kind == 8:  # unknown addresses
        return message(b"/" + bytes(rng.choice(b"abcxyz/_") for _ in range(rng.randrange(1, 40))), b"i",
                       struct.pack(">i", 1))
    if kind == 9:  # bundles nested past the limit (and a little inside it)
        inner = note(60, 0)
        for _ in range(rng.randrange(5, 40)):
            inner = bundle(1, inner)
        return inner
    if kind == 10:  # timetags far in the past (played at once, counted late) or far in the future (refused)
        at = rng.choice([2.0, ntp(time.time() - 1e6), ntp(time.time() + 1e6), 2 ** 32 - 1])
        return bundle(at, note(rng.randrange(48, 73), 1), message(b"/pgesam/note_off", b"i", struct.pack(">i", 60)))
    if kind == 11:  # more messages in one datagram than allowed
        return bundle(1, *[message(b"/a")] * 1100)
    if kind == 12:  # a bundle whose element sizes lie
        return b"#bundle\0" + struct.pack(">Qi", 1, rng.choice([-8, 10 ** 6, 3])) + note(60, 1)
    return message(b"/pgesam/status", b"i", struct.pack(">i", 1))  # arguments where none are taken


def sync(sock: socket.socket, to: tuple, timeout: float = 60.0) -> int:
    """Ping until a pong comes back -> pings sent. A pong follows every datagram the server received before the
    ping (one server thread, first in first out); a ping the kernel dropped (buffer full) is simply sent again."""
    end, pings = time.time() + timeout, 0
    while time.time() < end:
        pings += 1
        if any(a == "/pgesam/pong" for a, _ in ask_raw(sock, to, "/pgesam/ping", expect="/pgesam/pong",
                                                       timeout=0.5)):
            return pings
    raise AssertionError(f"no pong within {timeout} s")


# ------------------------------------------------------------------------------------------------ fuzzing
def test_fuzz_keeps_serving_with_bounded_error_replies_and_memory(server: OscServer, engine: Engine) -> None:
    rng = random.Random(12)
    to = server.address
    clients = [udp_socket() for _ in range(3)]
    control = udp_socket()
    counts = [0] * len(clients)
    sent = pings = 0

    def send_batch(n: int) -> None:
        nonlocal sent, pings
        for i in range(n):
            clients[i % len(clients)].sendto(fuzz_packet(rng), to)
            sent += 1
        pings += sync(control, to)  # closed loop: the server has seen the whole batch
        for i, c in enumerate(clients):
            counts[i] += sum(a == ERROR for a, _ in drain(c))

    t0 = time.monotonic()
    try:
        for _ in range(72):  # the first few batches also warm up (python-osc, logging, caches)
            send_batch(25)
        tracemalloc.start()  # traced for the last 500 only: tracing makes every allocation ~8x slower
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            send_batch(25)
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        end = time.time() + 30
        while server.slow_pending and time.time() < end:  # render/encode errors come from the worker thread
            time.sleep(0.05)
        for i, c in enumerate(clients):
            counts[i] += sum(a == ERROR for a, _ in drain(c, wait=0.2))
        elapsed = time.monotonic() - t0

        assert server.packets + server.kernel_dropped == sent + pings  # every datagram handled or counted
        assert server.bad_packets > 500
        budget = LIMITS.error_burst + LIMITS.error_rate * elapsed + 1
        assert all(0 < c <= budget for c in counts), (counts, budget)  # bounded per client, yet never silent
        assert server.errors_suppressed > 100 and server.error_replies == sum(counts)
        assert grown < 2 * 2 ** 20, f"traced memory grew {grown / 2 ** 20:.2f} MB over 500 hostile datagrams"
        assert engine.scheduler.pending <= engine.scheduler.max_pending + engine.scheduler.reserve
        assert len(server._buckets) <= LIMITS.max_clients
        print(f"\nfuzz: {sent} datagrams in {elapsed:.1f} s, {server.kernel_dropped} dropped by the kernel, "
              f"{server.bad_packets} malformed, "
              f"{server.router.errors} errors, {server.error_replies} error replies "
              f"({server.error_replies / elapsed / len(clients):.1f}/s per client), {server.errors_suppressed} "
              f"suppressed, traced memory {grown / 1024:.0f} kB")

        # valid messages are still answered correctly, by the same clients and by new ones
        c = clients[0]
        assert ask_raw(c, to, "/pgesam/ping", expect="/pgesam/pong") == [("/pgesam/pong", [])]
        assert ask_raw(c, to, "/pgesam/timbre", *TIMBRE, expect="/pgesam/timbre") == [("/pgesam/timbre",
                                                                                       [*TIMBRE, 0])]
        before = engine.scheduler.scheduled
        c.sendto(note(60, 100), to)
        status = status_of(ask_raw(c, to, "/pgesam/status", expect="/pgesam/status"))
        assert engine.scheduler.scheduled == before + 1
        assert status["bad_packets"] == server.bad_packets and status["errors_suppressed"] > 0
        fresh = udp_socket()
        [(address, (text,))] = ask_raw(fresh, to, "/pgesam/note", 5, 100, expect=ERROR)
        assert address == ERROR and "outside this model's MIDI range" in text
        fresh.close()
    finally:
        for s in clients + [control]:
            s.close()


def test_parse_limits_nesting_and_message_count() -> None:
    from pgesam_engine.osc import parse_packet
    deep = note(60, 0)
    for _ in range(9):
        deep = bundle(1, deep)
    with pytest.raises(ValueError, match="nested deeper than 8"):
        parse_packet(deep)
    assert len(parse_packet(bundle(1, *[note(60, 0)] * 1024))) == 1024
    with pytest.raises(ValueError, match="at most 1024 messages"):
        parse_packet(bundle(1, *[note(60, 0)] * 1025))


# ------------------------------------------------------------------------------------------------ scheduling
def test_far_future_bundles_are_bounded_and_all_off_clears_them(server: OscServer, engine: Engine) -> None:
    to, c = server.address, udp_socket()
    try:
        at = ntp(time.time() + 30.0)
        sched = engine.scheduler
        for k in range(30):  # 30 bundles x 40 notes = 1200 notes, 30 s ahead; the queue holds 500
            c.sendto(bundle(at + k * 0.01, *[note(48 + i % 25, 100) for i in range(40)]), to)
        status = status_of(ask_raw(c, to, "/pgesam/status", expect="/pgesam/status"))
        assert status["max_pending"] == 500
        assert 500 <= status["pending_events"] <= 500 + sched.reserve
        assert status["dropped_events"] >= 700
        c.sendto(message(b"/pgesam/note_off", b"i", struct.pack(">i", 60)), to)  # offs still get in when full
        c.sendto(message(b"/pgesam/all_off"), to)  # immediate: cancels everything sent before it
        end = time.time() + 20
        while sched.pending and time.time() < end:
            time.sleep(0.05)
        status = status_of(ask_raw(c, to, "/pgesam/status", expect="/pgesam/status"))
        assert status["pending_events"] == 0 and status["cancelled_events"] >= 500
        errors = [a for a, _ in drain(c)]
        assert errors.count(ERROR) <= LIMITS.error_burst + 1  # the dropped notes were told, within the rate
    finally:
        c.close()


def test_timed_all_off_releases_but_keeps_later_bundles(engine: Engine) -> None:
    from pgesam_engine.scheduler import Scheduler
    s = Scheduler(engine.backend.clock, 256, max_pending=3, reserve=1)
    assert [s.submit(i, f"on{i}") is not None for i in range(4)] == [True, True, True, False]
    assert s.submit(9, "off", essential=True) is not None and s.submit(10, "off", essential=True) is None
    assert s.dropped == 2 and s.pending == 4
    assert s.cancel_before(2) == 3 and s.pending == 1 and s.cancelled == 3  # seq 0-2 cancelled, 3 kept


# ------------------------------------------------------------------------------------------------ exposure
def test_allow_list_drops_and_counts_other_senders(engine: Engine) -> None:
    srv = OscServer(Router(engine), "127.0.0.1", 0, allow="127.0.0.1")
    srv.start()
    ok, stranger = udp_socket("127.0.0.1"), udp_socket("127.0.0.2")
    try:
        assert ask_raw(stranger, srv.address, "/pgesam/ping", timeout=0.5) == []
        assert ask_raw(ok, srv.address, "/pgesam/ping", expect="/pgesam/pong") == [("/pgesam/pong", [])]
        status = status_of(ask_raw(ok, srv.address, "/pgesam/status", expect="/pgesam/status"))
        assert status["denied"] == 1 and status["allow"] == "127.0.0.1/32"
    finally:
        ok.close(), stranger.close(), srv.stop()
    srv = OscServer(Router(engine), "127.0.0.1", 0, allow=["127.0.0.2/32"])
    srv.start()
    ok, stranger = udp_socket("127.0.0.2"), udp_socket("127.0.0.1")
    try:
        assert ask_raw(ok, srv.address, "/pgesam/ping", expect="/pgesam/pong") == [("/pgesam/pong", [])]
        assert ask_raw(stranger, srv.address, "/pgesam/ping", timeout=0.5) == [] and srv.denied == 1
    finally:
        ok.close(), stranger.close(), srv.stop()


def test_binding_beyond_loopback_needs_allow_remote_and_warns(engine: Engine) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.168.1.10")
    with pytest.raises(RemoteRefused, match="refusing to listen on 0.0.0.0.*--allow-remote"):
        OscServer(Router(engine), "0.0.0.0", 0)
    warnings: list[str] = []
    srv = OscServer(Router(engine), "0.0.0.0", 0, allow_remote=True, allow="127.0.0.1", warn=warnings.append)
    srv.start()
    c = udp_socket("127.0.0.2")
    try:
        assert len(warnings) == 1 and "reachable from other machines" in warnings[0] and "127.0.0.1/32" in warnings[0]
        port = srv.address[1]
        assert ask_raw(c, ("127.0.0.1", port), "/pgesam/ping", timeout=0.5) == [] and srv.denied == 1
    finally:
        c.close()
        srv.stop()
    with pytest.raises(ValueError, match="not an address, a network"):
        parse_allow("127.0.0.1,no such host!")


# ------------------------------------------------------------------------------------------------ file paths
def test_osc_paths_are_confined_to_their_folders(server: OscServer, engine: Engine, tmp_path: Path) -> None:
    out, inp, outside = tmp_path / "out", tmp_path / "in", tmp_path / "outside"
    for d in (out, inp, outside, out / "sub"):
        d.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "evil.wav").symlink_to(outside / "target.wav")
    secret = outside / "secret.wav"
    engine.render_note(*TIMBRE, 60, str(secret))
    (inp / "peek.wav").symlink_to(secret)
    config = engine.config
    engine.config = dataclasses.replace(config, output_dir=str(out), input_dir=str(inp))
    c, to = udp_socket(), server.address
    try:
        def refused(address: str, *args: object) -> str:
            [(a, (text,))] = ask_raw(c, to, address, *args, expect=ERROR)
            assert a == ERROR
            time.sleep(1 / LIMITS.error_rate)  # stay inside the error-reply budget
            return text

        assert "contains '..'" in refused("/pgesam/render", *TIMBRE, 60, "../escape.wav")
        assert "contains '..'" in refused("/pgesam/render", *TIMBRE, 60, "sub/../../escape.wav")
        assert "outside the allowed folder" in refused("/pgesam/render", *TIMBRE, 60, str(outside / "abs.wav"))
        assert "outside the allowed folder" in refused("/pgesam/render", *TIMBRE, 60, "link/through.wav")
        assert "outside the allowed folder" in refused("/pgesam/render", *TIMBRE, 60, "evil.wav")
        assert "must end in .wav" in refused("/pgesam/render", *TIMBRE, 60, "notes.txt")
        assert "outside the allowed folder" in refused("/pgesam/encode", str(secret))
        assert "contains '..'" in refused("/pgesam/encode", "../outside/secret.wav")
        assert "outside the allowed folder" in refused("/pgesam/encode", "peek.wav")
        assert sorted(p.name for p in outside.iterdir()) == ["secret.wav"]  # nothing written outside

        [(a, (path,))] = ask_raw(c, to, "/pgesam/render", *TIMBRE, 62, "sub/ok.wav", expect="/pgesam/rendered")
        assert a == "/pgesam/rendered" and Path(path) == (out / "sub" / "ok.wav").resolve() and Path(path).is_file()
        (inp / "mine.wav").write_bytes(Path(path).read_bytes())
        [(a, args)] = ask_raw(c, to, "/pgesam/encode", "mine.wav", expect="/pgesam/encoded")
        assert a == "/pgesam/encoded" and args[3] == 62
        assert not [p for p in out.rglob("*.part")]  # atomic writes leave no temporaries behind
    finally:
        engine.config = config
        c.close()


def test_render_queue_is_bounded(server: OscServer, engine: Engine, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gate, started = threading.Event(), threading.Event()
    real = engine.render_note

    def slow_render(*args: object) -> str:
        started.set()
        assert gate.wait(30)
        return real(*args)

    monkeypatch.setattr(engine, "render_note", slow_render)
    c, to = udp_socket(), server.address
    try:
        for i in range(8):
            b = OscMessageBuilder("/pgesam/render")
            for a in (*TIMBRE, 60, str(tmp_path / f"r{i}.wav")):
                b.add_arg(a)
            c.sendto(b.build().dgram, to)
            if i == 0:
                assert started.wait(30)  # the first one is running: 3 more may wait, 4 are refused
        replies = ask_raw(c, to, "/pgesam/ping", expect="/pgesam/pong")
        busy = [r for r in replies if r[0] == ERROR]
        assert len(busy) == 4 and all("busy" in r[1][0] for r in busy) and server.slow_dropped == 4
        gate.set()
        end, done = time.time() + 60, []
        while len(done) < 4 and time.time() < end:
            done += [r for r in drain(c, wait=0.5) if r[0] == "/pgesam/rendered"]
        assert len(done) == 4 and server.slow_pending == 0
    finally:
        gate.set()
        c.close()


def test_huge_and_hostile_strings_are_clipped_in_replies(server: OscServer) -> None:
    c, to = udp_socket(), server.address
    try:
        c.sendto(message(b"/" + b"z" * 50000), to)
        [(a, (text,))] = drain(c, wait=10)
        assert a == ERROR and "unknown address" in text and len(text) <= LIMITS.error_chars + 40
    finally:
        c.close()


def test_socket_is_loopback_by_default(engine: Engine) -> None:
    srv = OscServer(Router(engine), port=0)
    try:
        assert srv.address[0] == "127.0.0.1"
        assert srv.sock.family == socket.AF_INET
    finally:
        srv.stop()
