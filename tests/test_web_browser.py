"""`pgesam web` in a real browser: Debian's headless Chromium, driven through chromedriver's W3C WebDriver HTTP API
with urllib (no selenium). The page loads the map, a click chooses a timbre, the `a` key plays the lowest C of the
model's range; the page must have fetched and decoded that note at the chosen point and drawn the marker there.
A screenshot goes under pytest's tmp_path. Skipped only where Chromium or chromedriver is not installed.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the `web` extra (aiohttp) is not installed")
from engine_fixtures import PITCH_MIN, SR, tiny_bundle  # noqa: F401

from pgesam_engine.audio import NullBackend
from pgesam_engine.bundle import Bundle
from pgesam_engine.engine import Engine, EngineConfig
from pgesam_engine.synth import Synth
from pgesam_engine.web.api import WebApi
from pgesam_engine.web.server import API, WebServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecb"  # the W3C key of an element reference
# The network is closed: without these Chromium hangs on connections it tries at start.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--window-size=1200,820"]

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs, as JSON over HTTP to a chromedriver process."""

    def __init__(self, user_data_dir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        self.wait(lambda: self._call("GET", "/status").get("ready"), "chromedriver to start", errors_ok=True)
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": FLAGS + [f"--user-data-dir={user_data_dir}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from e

    def cmd(self, method: str, path: str, body: dict | None = None) -> object:
        return self._call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str, *args: object) -> object:
        return self.cmd("POST", "/execute/sync", {"script": js, "args": list(args)})

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 60.0,
             errors_ok: bool = False) -> object:
        end = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except (OSError, AssertionError):
                if not errors_ok:
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> WebServer:  # noqa: F811
    synth = Synth(Bundle(tiny_bundle, providers="cpu", threads=1))
    engine = Engine(synth, NullBackend(SR, 256), EngineConfig(prerender_default=False))
    srv = WebServer(WebApi(engine), "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def browser(tmp_path: Path) -> WebDriver:
    driver = WebDriver(tmp_path / "chromium-profile")
    yield driver
    driver.close()


STATE = "return window.pgesamState"
PIXEL = """const c = document.getElementById('map'), d = window.devicePixelRatio || 1;
return Array.from(c.getContext('2d').getImageData(Math.round(arguments[0] * d), Math.round(arguments[1] * d),
                                                  1, 1).data);"""


def test_click_the_map_press_a_and_hear_the_lowest_c(server: WebServer, browser: WebDriver, tmp_path: Path) -> None:
    browser.cmd("POST", "/url", {"url": server.url})
    browser.wait(lambda: browser.script("return !!(window.pgesamState && window.pgesamState.ready)"), "the page")
    start = browser.script(STATE)
    assert len(start["map"]["instruments"]) == 3 and start["error"] == ""
    canvas = browser.cmd("POST", "/element", {"using": "css selector", "value": "#map"})
    dx, dy = 84, -56  # CSS pixels right of and above the canvas centre: x > 0, y > 0 on the map
    browser.cmd("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse", "parameters": {
        "pointerType": "mouse"}, "actions": [
            {"type": "pointerMove", "duration": 0, "origin": canvas, "x": dx, "y": dy},
            {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}]})
    def clicked() -> dict | None:
        c = browser.script(STATE)["chosen"]
        return c if c and c["x"] > 0.2 else None  # the default timbre was (0, 0)
    chosen = browser.wait(clicked, "the clicked timbre to be chosen")
    scale = (560 - 2 * 28) / 2.0  # the page maps [-1, 1] onto its 560 px canvas with a 28 px margin
    assert chosen["x"] == pytest.approx(dx / scale, abs=0.01) and chosen["y"] == pytest.approx(-dy / scale, abs=0.01)
    assert not chosen["clamped"] and server.app[API].engine.timbre_point == (chosen["x"], chosen["y"])

    browser.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": [
        {"type": "keyDown", "value": "a"}, {"type": "keyUp", "value": "a"}]}]})
    played = browser.wait(lambda: [p for p in browser.script(STATE)["played"] if p["pitch"] == PITCH_MIN],
                          "the page to play pitch 48")
    state = browser.script(STATE)
    assert (played[0]["x"], played[0]["y"]) == (chosen["x"], chosen["y"])
    decoded = [n for n in state["notes"] if n["pitch"] == PITCH_MIN and (n["x"], n["y"]) == (chosen["x"], chosen["y"])]
    assert decoded and decoded[0]["duration"] == pytest.approx(4.0, abs=0.01) and decoded[0]["bytes"] > 4 * 96000
    assert state["error"] == "", state["error"]

    marker = state["marker"]
    assert (marker["x"], marker["y"]) == (chosen["x"], chosen["y"])
    assert marker["px"] == pytest.approx(280 + dx, abs=1.5) and marker["py"] == pytest.approx(280 + dy, abs=1.5)
    r, g, b, _ = browser.script(PIXEL, marker["px"], marker["py"])
    assert (r, g, b) == pytest.approx((0xff, 0x2d, 0x55), abs=12)  # the marker's colour at the chosen point
    r0, g0, b0, _ = browser.script(PIXEL, 280, 280)  # the map's centre, where the marker was before the click
    assert abs(r0 - 0xff) + abs(g0 - 0x2d) + abs(b0 - 0x55) > 60

    browser.cmd("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse", "parameters": {
        "pointerType": "mouse"}, "actions": [  # onto the flute's centroid at (0.5, 0.5): its name shows
            {"type": "pointerMove", "duration": 0, "origin": canvas, "x": round(0.5 * scale), "y": -round(0.5 * scale)}]}]})
    assert browser.wait(lambda: browser.script("return document.getElementById('map').title"),
                        "the hover label") == "flute_acoustic_002 (flute)"

    browser.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": [
        {"type": "keyDown", "value": "q"}, {"type": "keyUp", "value": "q"}]}]})  # the upper octave
    assert browser.script("return document.getElementById('octave').textContent").endswith("(60–72)")
    browser.wait(lambda: "all pitches rendered; 25 loaded" in browser.script(
        "return document.getElementById('progress').textContent"), "the page to load every pitch of the timbre")
    here = [n["pitch"] for n in browser.script(STATE)["notes"] if (n["x"], n["y"]) == (chosen["x"], chosen["y"])]
    assert sorted(here) == list(range(PITCH_MIN, PITCH_MIN + 25))  # each note fetched and decoded once

    png = base64.b64decode(browser.cmd("GET", "/screenshot"))
    shot = tmp_path / "timbre_map.png"
    shot.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
