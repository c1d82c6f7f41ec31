"""`pgesam web`: the page's API through aiohttp's test client, over the tiny fixture bundle's engine.

Checks the map from the manifest, choosing and clamping timbres, prerendered and streamed notes (WAV and raw
float32), uploads placed on the map (broken, empty, huge, hostile names; nothing left outside a temporary folder),
mirrored notes, JSON errors that never stop the server, the threaded server on a real socket, and the CLI command.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="the `web` extra (aiohttp) is not installed")
import soundfile
from aiohttp import ClientResponse, FormData
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from engine_fixtures import PITCH_MAX, PITCH_MIN, SR, dominant_hz, f0_of, tiny_bundle  # noqa: F401

from pgesam_engine.audio import NullBackend
from pgesam_engine.bundle import Bundle
from pgesam_engine.cli import cli
from pgesam_engine.engine import Engine, EngineConfig
from pgesam_engine.synth import Synth
from pgesam_engine.web.api import WebApi, WebConfig
from pgesam_engine.web.server import STATIC, WebServer, make_app


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    eng = Engine(synth, NullBackend(SR, 256), EngineConfig(prerender_default=False))
    yield eng
    eng.close()


def run(api: WebApi, scenario: Callable[[TestClient], Awaitable[object]]) -> object:
    """Run `scenario(client)` against the app over `api` on a fresh event loop."""
    async def main() -> object:
        async with TestClient(TestServer(make_app(api))) as client:
            return await scenario(client)
    return asyncio.run(main())


async def until_ready(client: TestClient, url: str, timeout: float = 30.0) -> ClientResponse:
    """GET `url` until it answers 200 (a note still rendering answers 202)."""
    end = time.monotonic() + timeout
    while True:
        resp = await client.get(url)
        if resp.status != 202 or time.monotonic() > end:
            return resp
        await asyncio.sleep(0.05)


def note_wav(engine: Engine, pitch: int, point: tuple[float, float] = (-0.2, 0.3)) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, engine.synth.render([point], [pitch])[0], SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_page_and_assets_are_local(engine: Engine) -> None:
    async def scenario(client: TestClient) -> None:
        page = await client.get("/")
        assert page.status == 200 and "/static/app.js" in await page.text()
        for asset in ("app.js", "style.css"):
            assert (await client.get(f"/static/{asset}")).status == 200
        assert (await client.get("/static/../api.py")).status in (403, 404)  # nothing outside static/
        assert (await client.get("/static/")).status in (403, 404)  # no listing
    run(WebApi(engine), scenario)
    for file in STATIC.iterdir():  # no CDN, no remote fonts: every asset comes from the package
        assert not re.search(r"https?://|//cdn", file.read_text()), file.name


def test_map_comes_from_the_manifest(engine: Engine) -> None:
    async def scenario(client: TestClient) -> dict:
        resp = await client.get("/api/map")
        assert resp.status == 200
        return await resp.json()
    m = run(WebApi(engine), scenario)
    assert m["bounds"] == {"x": [-1.0, 1.0], "y": [-1.0, 1.0]} and m["radius"] == 1.0
    assert (m["pitch_min"], m["pitch_max"], m["sample_rate"], m["note_seconds"]) == (PITCH_MIN, PITCH_MAX, SR, 4.0)
    assert m["instruments"][0] == {"name": "keyboard_acoustic_000", "family": "keyboard", "x": 0.1, "y": -0.4}
    assert m["families"] == ["flute", "keyboard", "organ"]
    assert m["timbre"]["x"] == engine.timbre_point[0] and m["timbre"]["total"] == PITCH_MAX - PITCH_MIN + 1


def test_choose_prerenders_and_notes_come_as_wav_or_float32(engine: Engine) -> None:
    async def scenario(client: TestClient) -> tuple[dict, dict, bytes, bytes, dict]:
        chosen = await (await client.post("/api/timbre", json={"x": 0.25, "y": -0.5})).json()
        assert engine.prerenderer.wait_idle(30)
        progress = await (await client.get("/api/timbre?x=0.25&y=-0.5")).json()
        wav = await client.get("/api/note?x=0.25&y=-0.5&pitch=60")
        f32 = await client.get("/api/note?x=0.25&y=-0.5&pitch=60&format=f32")
        assert wav.status == f32.status == 200 and wav.content_type == "audio/wav"
        return chosen, progress, await wav.read(), await f32.read(), dict(f32.headers)
    chosen, progress, wav, f32, headers = run(WebApi(engine), scenario)
    assert (chosen["x"], chosen["y"], chosen["clamped"]) == (0.25, -0.5, False) and "message" not in chosen
    assert engine.timbre_point == (0.25, -0.5)
    assert progress["complete"] and progress["ready"] == list(range(PITCH_MIN, PITCH_MAX + 1))
    audio, sr = soundfile.read(io.BytesIO(wav), dtype="float32")
    cached = engine.cache.get(0.25, -0.5, 60)
    assert sr == SR and np.array_equal(audio, cached) and np.array_equal(np.frombuffer(f32, "<f4"), cached)
    assert headers["X-Pgesam-Pitch"] == "60" and headers["X-Pgesam-Sample-Rate"] == str(SR)
    assert dominant_hz(audio[:SR]) == pytest.approx(f0_of(60), rel=0.01)


def test_off_map_points_are_clamped_with_a_message(engine: Engine) -> None:
    async def scenario(client: TestClient) -> tuple[dict, int, dict]:
        chosen = await (await client.post("/api/timbre", json={"x": 3.0, "y": 4.0})).json()
        note = await until_ready(client, "/api/note?x=30&y=40&pitch=50")
        return chosen, note.status, dict(note.headers)
    chosen, status, headers = run(WebApi(engine), scenario)
    assert (chosen["x"], chosen["y"], chosen["clamped"]) == (0.6, 0.8, True)
    assert "off the timbre map" in chosen["message"] and "(0.600, 0.800)" in chosen["message"]
    assert status == 200 and (headers["X-Pgesam-X"], headers["X-Pgesam-Y"], headers["X-Pgesam-Clamped"]) == \
        ("0.6", "0.8", "1")


def test_an_uncached_note_is_streamed_at_once(engine: Engine) -> None:
    async def scenario(client: TestClient) -> tuple[int, dict, int]:
        first = await client.get("/api/note?x=-0.3&y=0.1&pitch=50")  # a point nobody chose: nothing cached
        body = await first.json()
        later = await until_ready(client, "/api/note?x=-0.3&y=0.1&pitch=50")
        return first.status, body, later.status
    status, body, later = run(WebApi(engine), scenario)
    assert status == 202 and body == {"x": -0.3, "y": 0.1, "clamped": False, "pitch": 50, "note_ready": False}
    assert later == 200  # served from the stream (whether the cache kept it depends on what else it holds)


@pytest.mark.parametrize("method, url, body, status, fragment", [
    ("get", "/api/note?x=0&y=0&pitch=100", None, 400, "not a MIDI pitch this model plays (48-72)"),
    ("get", "/api/note?x=0&y=0&pitch=60.5", None, 400, "not a MIDI pitch"),
    ("get", "/api/note?x=abc&y=0&pitch=60", None, 400, "x must be a number"),
    ("get", "/api/note?x=nan&y=0&pitch=60", None, 400, "x must be a finite number"),
    ("get", "/api/note?x=0&pitch=60", None, 400, "missing query parameter(s): y"),
    ("get", "/api/note?x=0&y=0&pitch=60&format=mp3", None, 400, "format must be wav or f32"),
    ("get", "/api/timbre?x=0.777&y=0.111", None, 404, "has not been chosen"),
    ("post", "/api/timbre", "not json", 400, "must be a JSON object"),
    ("post", "/api/timbre", {"x": "left", "y": 0}, 400, "x must be a number"),
    ("post", "/api/play", {"pitch": 60}, 200, ""),  # not mirroring: accepted, nothing played
    ("get", "/api/nothing", None, 404, "Not Found"),
    ("put", "/api/timbre", {}, 405, "Method Not Allowed"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(
        engine: Engine, method: str, url: str, body: object, status: int, fragment: str) -> None:
    async def scenario(client: TestClient) -> tuple[int, dict, int]:
        kwargs = {"data": body} if isinstance(body, str) else {"json": body} if body is not None else {}
        resp = await getattr(client, method)(url, **kwargs)
        payload = await resp.json()
        return resp.status, payload, (await client.get("/api/map")).status
    got, payload, after = run(WebApi(engine), scenario)
    assert got == status and after == 200
    assert fragment in payload.get("error", "") if fragment else payload == {"mirrored": False}


def test_a_handler_bug_answers_500_json_and_serving_goes_on(engine: Engine, monkeypatch) -> None:
    api = WebApi(engine)
    monkeypatch.setattr(api, "map_info", lambda: 1 / 0)

    async def scenario(client: TestClient) -> tuple[int, dict, int]:
        resp = await client.get("/api/map")
        return resp.status, await resp.json(), (await client.get("/api/status")).status
    status, payload, after = run(api, scenario)
    assert status == 500 and "ZeroDivisionError" in payload["error"] and after == 200


def test_uploads_are_placed_on_the_map_and_only_touch_a_temporary_folder(
        engine: Engine, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory puts the upload
    wav = note_wav(engine, 67)

    async def scenario(client: TestClient) -> list[tuple[int, dict]]:
        out = []
        form = FormData()
        form.add_field("file", wav, filename="../../../etc/evil.wav", content_type="audio/wav")
        for kwargs in ({"data": form},
                       {"data": wav, "params": {"name": "raw.wav"}},
                       {"data": b"this is not audio at all", "params": {"name": "notes.txt"}},
                       {"data": b"", "params": {"name": "empty.wav"}}):
            resp = await client.post("/api/encode", **kwargs)
            out.append((resp.status, await resp.json()))
        return out
    (s1, multipart), (s2, raw), (s3, broken), (s4, empty) = run(WebApi(engine), scenario)
    assert s1 == s2 == 200 and multipart["pitch"] == raw["pitch"] == 67
    assert multipart["file"] == "evil.wav" and -1 <= multipart["x"] <= 1 and len(multipart["nearest"]) == 3
    assert {"name", "family", "distance"} <= set(multipart["nearest"][0])
    assert s3 == 400 and "notes.txt" in broken["error"] and "pgesam-upload" not in broken["error"]
    assert s4 == 400 and "empty.wav is empty" in empty["error"]
    assert list(tmp_path.iterdir()) == []  # every upload's folder was removed


def test_huge_uploads_are_refused(engine: Engine) -> None:
    api = WebApi(engine, WebConfig(max_upload_mb=0.05))

    async def scenario(client: TestClient) -> list[tuple[int, dict]]:
        big = b"\0" * 200_000
        form = FormData()
        form.add_field("file", big, filename="big.wav")
        out = []
        for kwargs in ({"data": form}, {"data": big}):
            resp = await client.post("/api/encode", **kwargs)
            out.append((resp.status, await resp.json()))
        out.append(((await client.get("/api/map")).status, {}))
        return out
    (s1, a), (s2, b), (after, _) = run(api, scenario)
    assert s1 == s2 == 413 and "0.05 MB upload limit" in a["error"] and "upload limit" in b["error"]
    assert after == 200


def test_mirrored_notes_reach_the_engine(engine: Engine) -> None:
    api = WebApi(engine, WebConfig(mirror=True))

    async def scenario(client: TestClient) -> list[tuple[int, dict]]:
        out = []
        for path, body in (("/api/play", {"pitch": 60, "velocity": 100, "x": 0.25, "y": -0.5}),
                           ("/api/release", {"pitch": 60}),
                           ("/api/play", {"pitch": 60, "velocity": 500, "x": 0.25, "y": -0.5})):
            resp = await client.post(path, json=body)
            out.append((resp.status, await resp.json()))
        return out
    before = engine.scheduler.scheduled
    (s1, on), (s2, off), (s3, bad) = run(api, scenario)
    assert s1 == s2 == 200 and on == off == {"mirrored": True} and engine.scheduler.scheduled == before + 2
    assert s3 == 400 and "velocity 500.0 is outside 0-127" in bad["error"]


def test_threaded_server_on_a_real_socket(engine: Engine) -> None:
    server = WebServer(WebApi(engine), "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(server.url + "api/map", timeout=10) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["instruments"]) == 3
    finally:
        server.stop()
    with pytest.raises(OSError, match="choose another --port"):
        busy = WebServer(WebApi(engine), "127.0.0.1", 0)
        try:
            busy.sock.listen()
            WebServer(WebApi(engine), "127.0.0.1", busy.address[1])
        finally:
            busy.sock.close()


def test_cli_web_command_serves_and_stops(tiny_bundle: Path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own Ctrl-C handling
    result = CliRunner().invoke(cli, ["web", "--bundle", str(tiny_bundle), "--provider", "cpu", "--threads", "1",
                                      "--port", "0", "--duration", "0.3"])
    assert result.exit_code == 0, result.output
    assert re.search(r"pgesam web page at http://127\.0\.0\.1:\d+/", result.output)
    assert "--max-upload-mb" in CliRunner().invoke(cli, ["web", "--help"]).output
    refused = CliRunner().invoke(cli, ["web", "--bundle", str(tiny_bundle), "--provider", "cpu", "--host", "0.0.0.0",
                                       "--port", "0", "--duration", "0.3"])
    assert refused.exit_code != 0 and "--allow-remote" in refused.output


def test_notes_play_even_when_the_cache_has_no_room(tiny_bundle: Path) -> None:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    small = Engine(synth, NullBackend(SR, 256), EngineConfig(prerender_default=False, cache_mb=0.0))
    try:
        async def scenario(client: TestClient) -> tuple[dict, int, bytes]:
            chosen = await (await client.post("/api/timbre", json={"x": 0.1, "y": 0.1})).json()
            note = await until_ready(client, "/api/note?x=0.1&y=0.1&pitch=55&format=f32")
            return chosen, note.status, await note.read()
        chosen, status, data = run(WebApi(small), scenario)
    finally:
        small.close()
    assert "larger --cache-mb" in chosen["error"]
    assert status == 200 and dominant_hz(np.frombuffer(data, "<f4")[:SR]) == pytest.approx(f0_of(55), rel=0.01)


def test_a_bundle_without_encoder_says_so(engine: Engine, monkeypatch) -> None:
    from pgesam_engine.bundle import BundleError

    def no_encoder(path: str) -> None:
        raise BundleError("bundle at X has no codec_encoder graph, which this needs")
    monkeypatch.setattr(engine, "encode_file", no_encoder)

    async def scenario(client: TestClient) -> tuple[int, dict]:
        resp = await client.post("/api/encode", data=b"RIFF....", params={"name": "a.wav"})
        return resp.status, await resp.json()
    status, payload = run(WebApi(engine), scenario)
    assert status == 501 and "no codec_encoder graph" in payload["error"]
