"""OSC: routing without sockets, packet parsing, and a real UDP round trip over loopback with python-osc."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from engine_fixtures import OscClient, tiny_bundle  # noqa: F401 (pytest fixture)
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from pgesam_engine.audio import NullBackend
from pgesam_engine.bundle import Bundle
from pgesam_engine.engine import Engine, EngineConfig
from pgesam_engine.osc import ERROR, Router, address_table, build, parse_packet
from pgesam_engine.osc_server import OscServer
from pgesam_engine.synth import Synth


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    eng = Engine(synth, NullBackend(24000, 256), EngineConfig(prerender_default=False))
    yield eng
    eng.close()


@pytest.fixture
def router(engine: Engine) -> Router:
    return Router(engine)


def is_error(replies: list, fragment: str) -> bool:
    return len(replies) == 1 and replies[0][0] == ERROR and fragment in replies[0][1][0]


def test_timbre_and_note_handlers(router: Router, engine: Engine) -> None:
    assert router.dispatch("/pgesam/timbre", [0.25, -0.5]) == [("/pgesam/timbre", [0.25, -0.5, 0])]
    assert router.dispatch("/pgesam/timbre", [3.0, 4.0]) == [("/pgesam/timbre", [0.6, 0.8, 1])]  # clamped
    before = engine.scheduler.scheduled
    assert router.dispatch("/pgesam/note", [60, 100]) == []
    assert router.dispatch("/pgesam/note", [62.0, 90.5, 0.1, 0.1]) == []  # whole floats are fine for pitch
    assert router.dispatch("/pgesam/note", [64, 100, 0.0, 5.0]) == [("/pgesam/clamped", [0.0, 1.0])]
    assert router.dispatch("/pgesam/note", [64, 0]) == []  # velocity 0 = note off
    assert router.dispatch("/pgesam/note_off", [60]) == [] and router.dispatch("/pgesam/all_off", []) == []
    assert engine.scheduler.scheduled == before + 6


def test_malformed_and_out_of_range_messages_get_errors(router: Router) -> None:
    assert is_error(router.dispatch("/pgesam/note", [60]), "usage: /pgesam/note pitch velocity [x y]")
    assert is_error(router.dispatch("/pgesam/note", [60, 100, 0.5]), "takes 2 or 4 arguments, got 3")
    assert is_error(router.dispatch("/pgesam/note", ["sixty", 100]), "pitch must be a number")
    assert is_error(router.dispatch("/pgesam/note", [60.5, 100]), "pitch must be a whole number")
    assert is_error(router.dispatch("/pgesam/note", [100, 100]), "outside this model's MIDI range 48-72")
    assert is_error(router.dispatch("/pgesam/note", [60, 128]), "velocity 128.0 is outside 0-127")
    assert is_error(router.dispatch("/pgesam/timbre", [float("nan"), 0.0]), "not a finite number")
    assert is_error(router.dispatch("/pgesam/render", [0, 0, 60, "/no/such/dir/x.wav"]), "does not exist")
    assert is_error(router.dispatch("/pgesam/encode", ["/no/such/file.wav"]), "no audio file")
    assert is_error(router.dispatch("/pgesam/bogus", []), "unknown address /pgesam/bogus")
    assert router.errors >= 10


def test_status_map_and_ping(router: Router, engine: Engine) -> None:
    [(address, flat)] = router.dispatch("/pgesam/status", [])
    status = dict(zip(flat[::2], flat[1::2]))
    assert address == "/pgesam/status" and status["provider"] == "CPUExecutionProvider"
    assert {"voices", "cache_timbres", "underruns", "late", "latency_ms_p99", "jitter_ms"} <= set(status)
    replies = router.dispatch("/pgesam/map", [])
    assert replies[0] == ("/pgesam/map", [3, 1.0, -1.0, 1.0, -1.0, 1.0])
    assert replies[1] == ("/pgesam/instrument", [0, "keyboard_acoustic_000", "keyboard", 0.1, -0.4])
    assert router.dispatch("/pgesam/ping", []) == [("/pgesam/pong", [])]
    assert "`/pgesam/note`" in address_table()


def test_render_and_encode_handlers(router: Router, tmp_path: Path) -> None:
    path = str(tmp_path / "n.wav")
    assert router.dispatch("/pgesam/render", [-1.0, -1.0, 67, path]) == [("/pgesam/rendered", [path])]
    [(address, (x, y, name, pitch))] = router.dispatch("/pgesam/encode", [path])
    assert address == "/pgesam/encoded" and pitch == 67 and isinstance(name, str) and -1 <= x <= 1


def bundle_dgram(at: float, *messages: tuple[str, list], inner_at: float | None = None) -> bytes:
    b = OscBundleBuilder(at)
    for address, args in messages:
        m = OscMessageBuilder(address)
        for a in args:
            m.add_arg(a)
        b.add_content(m.build())
    if inner_at is not None:
        inner = OscBundleBuilder(inner_at)
        inner.add_content(OscMessageBuilder("/pgesam/all_off").build())
        b.add_content(inner.build())
    return b.build().dgram


def test_parse_packet_keeps_timetags_including_past_and_nested() -> None:
    assert parse_packet(build("/pgesam/note", [60, 100])) == [("/pgesam/note", [60, 100], None)]
    msgs = parse_packet(bundle_dgram(1000.5, ("/pgesam/note", [60, 100]), inner_at=1001.25))
    assert [(a, p) for a, p, _ in msgs] == [("/pgesam/note", [60, 100]), ("/pgesam/all_off", [])]
    assert msgs[0][2] == pytest.approx(1000.5, abs=1e-6) and msgs[1][2] == pytest.approx(1001.25, abs=1e-6)
    assert parse_packet(bundle_dgram(0, ("/pgesam/all_off", [])))[0][2] is None  # IMMEDIATELY
    with pytest.raises(ValueError, match="not an OSC packet"):
        parse_packet(b"hello")
    with pytest.raises(ValueError, match="malformed OSC packet"):
        parse_packet(b"#bundle\x00\x00\x00")


@pytest.fixture
def served(engine: Engine) -> tuple[OscServer, OscClient]:
    server = OscServer(Router(engine), "127.0.0.1", 0)
    server.start()
    client = OscClient(*server.address)
    yield server, client
    client.close()
    server.stop()


def test_udp_round_trip_replies_to_the_sender(served: tuple[OscServer, OscClient], tmp_path: Path) -> None:
    server, client = served
    assert client.ask("/pgesam/ping") == [("/pgesam/pong", [])]
    assert client.ask("/pgesam/timbre", 0.5, 0.5) == [("/pgesam/timbre", [0.5, 0.5, 0])]
    client.client._sock.sendto(b"garbage that is not OSC", server.address)  # from the client's own port
    [(address, (message,))] = client.replies()
    assert address == ERROR and "not an OSC packet" in message
    assert is_error(client.ask("/pgesam/note", 5, 100), "outside this model's MIDI range")
    path = str(tmp_path / "udp.wav")
    assert client.ask("/pgesam/render", 0.0, 0.0, 60, path, timeout=30) == [("/pgesam/rendered", [path])]
    assert Path(path).stat().st_size > 96000
    assert client.ask("/pgesam/ping") == [("/pgesam/pong", [])]  # still serving
    assert server.bad_packets == 1


def test_reply_port_sends_replies_to_a_chosen_port(engine: Engine) -> None:
    listener = OscClient("127.0.0.1", 9)  # only its socket is used: it stands for Max's [udpreceive N]
    listener.client._sock.bind(("127.0.0.1", 0))
    port = listener.client._sock.getsockname()[1]
    server = OscServer(Router(engine), "127.0.0.1", 0, reply_port=port)
    server.start()
    sender = OscClient(*server.address)  # stands for [udpsend]: sends from a port nobody reads
    try:
        sender.send("/pgesam/ping")
        assert listener.replies() == [("/pgesam/pong", [])]
        assert sender.replies(timeout=0.3) == []
    finally:
        sender.close()
        listener.close()
        server.stop()


def test_udp_bundle_is_scheduled_on_the_audio_clock(served: tuple[OscServer, OscClient], engine: Engine) -> None:
    server, client = served
    engine.scheduler.clear()
    engine.backend.clock.anchor(0, time.time())
    at = time.time() + 5.0
    expected = engine.backend.clock.sample_at(at)
    client.send_bundle(at, [("/pgesam/note_off", [61])])
    client.send("/pgesam/ping")
    assert client.replies() == [("/pgesam/pong", [])]  # the server did not sleep until the timetag
    due = [(off, ev) for off, ev in engine.scheduler.due(expected - 100, 200)]
    assert [(off, ev.payload.pitch, ev.timed) for off, ev in due] == [(100, 61, True)]


@pytest.mark.skipif(shutil.which("oscsend") is None, reason="liblo-tools (oscsend) not installed")
def test_liblo_oscsend_is_understood_and_a_gone_sender_does_not_stop_the_server(
        served: tuple[OscServer, OscClient], engine: Engine) -> None:
    server, client = served
    host, port = server.address
    before = engine.scheduler.scheduled
    subprocess.run(["oscsend", host, str(port), "/pgesam/note", "if", "60", "100.0"], check=True, timeout=10)
    subprocess.run(["oscsend", host, str(port), "/pgesam/timbre", "ff", "0.1", "0.2"], check=True, timeout=10)
    assert client.ask("/pgesam/ping") == [("/pgesam/pong", [])]  # replies to oscsend's closed port were harmless
    assert engine.scheduler.scheduled == before + 1 and engine.timbre_point == (0.1, 0.2)
