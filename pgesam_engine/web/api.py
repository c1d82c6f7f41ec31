"""What the web page can ask of the engine, as plain methods on a `WebApi` over an `Engine` (no HTTP here).

server.py only routes HTTP requests to these methods (the OSC habit: routing apart from networking), so they are
testable without a socket. Points are map coordinates, pitches MIDI numbers, audio float32 at the bundle's rate.
    map_info   the manifest's map: bounds, radius, instrument centroids (name, family), pitch range
    choose     make (x, y) the engine's timbre (clamped onto the map) and prerender its pitches
    progress   which pitches of a chosen timbre are in the timbre cache
    note       one note's audio from the cache; an uncached note is streamed into the cache at once
    encode     an uploaded audio file -> its map point (the engine's encoder), written only to a temporary folder
    play/release  mirror the page's notes to the engine's own audio output (when it has one)
"""
from __future__ import annotations

import io
import logging
import math
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from ..bundle import BundleError
from ..engine import Engine, EngineError
from ..voices import StreamSource

log = logging.getLogger("pgesam.web")
Key = tuple[float, float]


class WebError(ValueError):
    """A request the page made that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WebConfig:
    """The web front end's limits, in one place."""
    max_upload_mb: float = 20.0  # uploads above this are refused (413)
    mirror: bool = False  # also play the page's notes on the engine's audio output
    remember_timbres: int = 64  # chosen timbres whose progress the page may ask for
    max_rushed: int = 4  # uncached notes streamed ahead of the prerender at once; more wait their turn


def number(value: object, name: str) -> float:
    """A query or JSON value -> a finite float, or WebError naming the parameter."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WebError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise WebError(f"{name} must be a finite number, got {value!r}")
    return out


class WebApi:
    """The page's view of one `Engine`. Methods are called from the server's event loop thread (encode from a
    worker thread); the engine's cache, prerenderer and streamer are thread-safe."""

    def __init__(self, engine: Engine, config: WebConfig = WebConfig()):
        self.engine, self.config = engine, config
        self.m = engine.synth.m
        self._chosen: OrderedDict[Key, None] = OrderedDict()  # timbres the page chose, most recent last
        self._rushed: dict[tuple[Key, int], StreamSource] = {}  # notes streamed ahead of the prerender
        self._failures_seen = engine.prerenderer.failures

    # ------------------------------------------------------------------------------------------- helpers
    def point(self, x: object, y: object) -> tuple[Key, bool]:
        """Query values -> (cache key of the point the engine will use, whether it was moved onto the map)."""
        fx, fy = number(x, "x"), number(y, "y")
        cx, cy, moved = self.m.map.clamp(fx, fy, self.engine.config.allow_outside)
        return self.engine.cache.key(cx, cy), moved

    def pitch(self, value: object) -> int:
        p = number(value, "pitch")
        if not p.is_integer() or not self.m.pitch_min <= p <= self.m.pitch_max:
            raise WebError(f"pitch {value} is not a MIDI pitch this model plays ({self.m.pitch_min}-"
                           f"{self.m.pitch_max})")
        return int(p)

    @staticmethod
    def clamp_message(x: object, y: object, key: Key) -> str:
        return (f"({number(x, 'x'):.3f}, {number(y, 'y'):.3f}) is off the timbre map; "
                f"moved onto its edge at ({key[0]:.3f}, {key[1]:.3f})")

    # ------------------------------------------------------------------------------------------- map and timbre
    def map_info(self) -> dict:
        """The manifest's map for drawing: bounds, radius, instruments (name, family, x, y), pitch range."""
        mp = self.m.map
        insts = [{"name": d.get("name", ""), "family": d.get("family", ""), "x": float(d["x"]), "y": float(d["y"])}
                 for d in self.engine.instruments()]
        return {"bounds": {"x": list(mp.x_range), "y": list(mp.y_range)}, "radius": mp.radius,
                "instruments": insts, "families": sorted({d["family"] for d in insts}),
                "pitch_min": self.m.pitch_min, "pitch_max": self.m.pitch_max, "sample_rate": self.m.sample_rate,
                "note_seconds": self.m.note_samples / self.m.sample_rate,
                "allow_outside": self.engine.config.allow_outside, "mirror": self.config.mirror,
                "max_upload_mb": self.config.max_upload_mb, "timbre": self.progress(*self._remember(
                    self.engine.timbre_point))}

    def _remember(self, key: Key) -> Key:
        self._chosen[key] = None
        self._chosen.move_to_end(key)
        while len(self._chosen) > self.config.remember_timbres:
            self._chosen.popitem(last=False)
        return key

    def choose(self, x: object, y: object) -> dict:
        """Make (x, y) the engine's timbre and prerender its pitches -> its progress (+ clamped, message)."""
        key, moved = self.point(x, y)
        self._failures_seen = self.engine.prerenderer.failures  # report only failures of this request
        try:
            kx, ky, _ = self.engine.set_timbre(*key)
        except EngineError as e:
            raise WebError(str(e)) from e
        self._remember((kx, ky))
        out = {**self.progress(kx, ky), "clamped": moved}
        if moved:
            out["message"] = self.clamp_message(x, y, (kx, ky))
        return out

    def progress(self, x: object, y: object) -> dict:
        """Which pitches of the chosen timbre (x, y) are rendered: {x, y, clamped, ready: [MIDI...], total,
        complete, rendering, error}. WebError 404 for a point never chosen (choose it first)."""
        key, moved = self.point(x, y)
        if key not in self._chosen:
            raise WebError(f"timbre ({key[0]:.3f}, {key[1]:.3f}) has not been chosen; POST /api/timbre first", 404)
        entry = self.engine.cache.entry(key)  # the entry the prerenderer fills (re-made if it was evicted)
        ready = [] if entry is None else (np.flatnonzero(entry.ready) + self.m.pitch_min).tolist()
        complete = len(ready) == self.m.n_pitches
        error = self._render_error()
        if not complete and not error and key == self.engine.timbre_point and not self.engine.prerenderer.busy:
            self.engine.prerenderer.request(key)  # evicted or interrupted: render it again
        out = {"x": key[0], "y": key[1], "clamped": moved, "ready": ready, "total": self.m.n_pitches,
               "complete": complete, "rendering": key == self.engine.timbre_point and self.engine.prerenderer.busy}
        if entry is None:
            error = error or "the timbre cache is too small for one timbre; start with a larger --cache-mb"
        if error:
            out["error"] = error
        return out

    def _render_error(self) -> str:
        p = self.engine.prerenderer
        return f"prerendering failed: {p.last_error}" if p.failures > self._failures_seen else ""

    # ------------------------------------------------------------------------------------------- notes
    def note(self, x: object, y: object, pitch: object) -> tuple[np.ndarray | None, Key, int, bool]:
        """One note -> (audio (samples,) float32 or None while it renders, the key used, MIDI pitch, clamped).

        A note not in the cache is streamed at once (ahead of the prerender; the streamer stores it in the
        cache when done), so a key pressed before its timbre is complete plays as soon as that one note exists.
        WebError 500 when streaming it failed (the next request tries again).
        """
        key, moved = self.point(x, y)
        p = self.pitch(pitch)
        audio = self.engine.cache.get(*key, p)
        source = self._rushed.pop((key, p), None)
        if audio is not None:
            return audio, key, p, moved
        if source is not None and source.finished:  # done, though the cache may have had no room for it
            if source.failed:
                raise WebError(f"rendering pitch {p} at ({key[0]:.3f}, {key[1]:.3f}) failed; see the server log",
                               500)
            return source.samples, key, p, moved
        if source is None:
            if len(self._rushed) > 1024:  # finished notes nobody came back for
                self._rushed = {k: s for k, s in self._rushed.items() if not s.finished}
            if sum(not s.finished for s in self._rushed.values()) >= self.config.max_rushed:
                return None, key, p, moved  # the page asks again shortly
            source = self.engine.streamer.start_note(key, key, p)
        self._rushed[(key, p)] = source
        return None, key, p, moved

    def pending(self, key: Key, pitch: int, moved: bool) -> dict:
        """What to tell the page about a note still rendering: its timbre's progress where it was chosen."""
        out = self.progress(*key) if key in self._chosen else {"x": key[0], "y": key[1], "clamped": moved}
        return {**out, "pitch": pitch, "note_ready": False}

    def play(self, pitch: object, velocity: object, x: object, y: object) -> dict:
        """Mirror a note-on to the engine's audio output (no-op unless mirroring)."""
        if not self.config.mirror:
            return {"mirrored": False}
        key, _ = self.point(x, y)
        try:
            self.engine.note(self.pitch(pitch), number(velocity, "velocity"), *key)
        except EngineError as e:
            raise WebError(str(e)) from e
        return {"mirrored": True}

    def release(self, pitch: object) -> dict:
        if not self.config.mirror:
            return {"mirrored": False}
        self.engine.note_off(self.pitch(pitch))
        return {"mirrored": True}

    # ------------------------------------------------------------------------------------------- upload
    def encode(self, data: bytes, filename: str) -> dict:
        """An uploaded audio file's bytes -> {x, y (clamped onto the map), pitch, nearest, clamped, message}.

        The bytes go to a file with a fixed name in a fresh temporary folder (the user's file name is never
        used as a path), removed afterwards. Runs the model: call it off the event loop.
        """
        shown = Path(unquote(filename or "").replace("\\", "/")).name or "upload"
        if not data:
            raise WebError(f"{shown} is empty")
        if len(data) > self.config.max_upload_mb * 2 ** 20:
            raise WebError(f"{shown} is larger than the {self.config.max_upload_mb:g} MB upload limit", 413)
        with tempfile.TemporaryDirectory(prefix="pgesam-upload-") as folder:
            path = Path(folder) / "upload.audio"
            path.write_bytes(data)
            try:
                enc = self.engine.encode_file(str(path))
            except EngineError as e:
                raise WebError(str(e).replace(str(path), shown)) from e
            except BundleError as e:  # the bundle has no encoder graphs
                raise WebError(str(e), 501) from e
            except Exception as e:  # libsndfile and the model may raise anything on a strange file
                log.warning("encoding upload %s failed: %s: %s", shown, type(e).__name__, e)
                raise WebError(f"cannot use {shown} as audio: {type(e).__name__}: "
                               f"{str(e).replace(str(path), shown)}") from e
        key, moved = self.point(enc.x, enc.y)
        out = {"x": key[0], "y": key[1], "encoded_x": enc.x, "encoded_y": enc.y, "pitch": enc.pitch,
               "clamped": moved, "file": shown,
               "nearest": [{"name": d.get("name", ""), "family": d.get("family", ""), "distance": round(dist, 4)}
                           for d, dist in enc.nearest]}
        if moved:
            out["message"] = self.clamp_message(enc.x, enc.y, key)
        return out


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """audio (samples,) float32 -> a float32 WAV file's bytes."""
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, np.asarray(audio, np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()
