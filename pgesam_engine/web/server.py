"""`pgesam web`: an aiohttp server for the timbre-map page; it only routes HTTP requests to `WebApi` methods.

    GET  /                       the page (static/index.html; its script and style under /static/, all local)
    GET  /api/map                the manifest's map, pitch range, the current timbre's progress
    POST /api/timbre {x, y}      choose a timbre: clamped onto the map, its pitches prerendered
    GET  /api/timbre?x=&y=       progress of a chosen timbre: which pitches are ready
    GET  /api/note?x=&y=&pitch=[&format=wav|f32]   200 a float32 WAV (or raw little-endian float32 PCM), or
                                 202 JSON progress while the note renders (it is streamed into the cache at once)
    POST /api/encode             an audio file (multipart field `file`, or the raw body with ?name=) -> map point
    POST /api/play {pitch, velocity, x, y}, POST /api/release {pitch}   mirror notes to the engine's audio output
    GET  /api/status             the engine's status
Every /api error is JSON {"error": message} with a 4xx/5xx status; nothing a request does stops the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from .api import WebApi, WebError, wav_bytes

log = logging.getLogger("pgesam.web")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8130
API = web.AppKey("api", WebApi)
POOL = web.AppKey("pool", ThreadPoolExecutor)
NO_STORE = {"Cache-Control": "no-store"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(data: dict, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=NO_STORE)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API errors as JSON {"error": message}: the page shows the message; the server keeps serving."""
    try:
        return await handler(request)
    except WebError as e:
        log.info("%s %s: %s", request.method, request.path_qs, e)
        return reply({"error": str(e)}, e.status)
    except web.HTTPException as e:
        if not request.path.startswith("/api/") or e.status < 400:
            raise
        return reply({"error": f"{e.reason}: {request.method} {request.path}"}, e.status)
    except Exception as e:  # a bug: log it in full, answer, keep serving
        log.exception("%s %s failed", request.method, request.path_qs)
        return reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)


async def body_json(request: web.Request) -> dict:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise WebError("the request body must be a JSON object, e.g. {\"x\": 0.1, \"y\": -0.2}")
    return data


def query(request: web.Request, *names: str) -> list[str]:
    missing = [n for n in names if n not in request.query]
    if missing:
        raise WebError(f"missing query parameter(s): {', '.join(missing)}")
    return [request.query[n] for n in names]


# ------------------------------------------------------------------------------------------------- handlers
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=NO_STORE)


async def get_map(request: web.Request) -> web.Response:
    return reply(request.app[API].map_info())


async def post_timbre(request: web.Request) -> web.Response:
    data = await body_json(request)
    return reply(request.app[API].choose(data.get("x"), data.get("y")))


async def get_timbre(request: web.Request) -> web.Response:
    return reply(request.app[API].progress(*query(request, "x", "y")))


async def get_note(request: web.Request) -> web.Response:
    api = request.app[API]
    x, y, pitch = query(request, "x", "y", "pitch")
    fmt = request.query.get("format", "wav")
    if fmt not in ("wav", "f32"):
        raise WebError(f"format must be wav or f32, got {fmt!r}")
    audio, key, midi, moved = api.note(x, y, pitch)
    if audio is None:
        return reply(api.pending(key, midi, moved), 202)
    headers = {"X-Pgesam-X": str(key[0]), "X-Pgesam-Y": str(key[1]), "X-Pgesam-Pitch": str(midi),
               "X-Pgesam-Clamped": str(int(moved)), "X-Pgesam-Sample-Rate": str(api.m.sample_rate),
               "Cache-Control": "no-cache"}
    if fmt == "f32":
        return web.Response(body=audio.astype("<f4").tobytes(), content_type="application/octet-stream",
                            headers=headers)
    return web.Response(body=wav_bytes(audio, api.m.sample_rate), content_type="audio/wav", headers=headers)


async def read_upload(request: web.Request, limit_mb: float) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, read in chunks; WebError 413 past `limit_mb` MB."""
    limit = int(limit_mb * 2 ** 20)
    too_big = WebError(f"the file is larger than the {limit_mb:g} MB upload limit", 413)
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise too_big
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "name", None) == "file":
                return await _read_limited(part.read_chunk, limit, too_big), part.filename or "upload"
        raise WebError("the upload has no `file` field")
    return await _read_limited(request.content.read, limit, too_big), request.query.get("name", "upload")


async def _read_limited(read: Callable[[int], Awaitable[bytes]], limit: int, too_big: WebError) -> bytes:
    chunks, size = [], 0
    while chunk := await read(2 ** 16):
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def post_encode(request: web.Request) -> web.Response:
    api = request.app[API]
    data, name = await read_upload(request, api.config.max_upload_mb)
    loop = asyncio.get_running_loop()
    return reply(await loop.run_in_executor(request.app[POOL], api.encode, data, name))


async def post_play(request: web.Request) -> web.Response:
    data = await body_json(request)
    return reply(request.app[API].play(data.get("pitch"), data.get("velocity", 100), data.get("x"), data.get("y")))


async def post_release(request: web.Request) -> web.Response:
    data = await body_json(request)
    return reply(request.app[API].release(data.get("pitch")))


async def get_status(request: web.Request) -> web.Response:
    return reply(request.app[API].engine.status())


def make_app(api: WebApi) -> web.Application:
    """The aiohttp application serving the page and the API over `api`."""
    app = web.Application(middlewares=[json_errors], client_max_size=int(api.config.max_upload_mb * 2 ** 20))
    app[API] = api
    app[POOL] = ThreadPoolExecutor(1, thread_name_prefix="pgesam-web-encode")  # one model call at a time
    app.on_cleanup.append(_close_pool)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.router.add_get("/api/map", get_map)
    app.router.add_post("/api/timbre", post_timbre)
    app.router.add_get("/api/timbre", get_timbre)
    app.router.add_get("/api/note", get_note)
    app.router.add_post("/api/encode", post_encode)
    app.router.add_post("/api/play", post_play)
    app.router.add_post("/api/release", post_release)
    app.router.add_get("/api/status", get_status)
    return app


async def _close_pool(app: web.Application) -> None:
    app[POOL].shutdown(wait=False, cancel_futures=True)


class WebServer:
    """The app on a TCP socket bound at construction (so port 0 is known at once); `start()` serves it from a
    thread with its own event loop, `stop()` ends it."""

    def __init__(self, api: WebApi, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        self.app = make_app(api)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from e
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self.app, handle_signals=False)
        await runner.setup()
        try:
            await web.SockSite(runner, self.sock).start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self.error = e
            log.exception("the web server stopped")
        finally:
            self._ready.set()

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="pgesam-web", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise OSError(f"the web server did not start: {self.error}") from self.error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop ended meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.sock.close()
