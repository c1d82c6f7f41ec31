"""`pgesam`: render notes, serve the instrument over OSC, encode audio, inspect a bundle, benchmark.

Every failure is one line on stderr and a non-zero exit. Without --bundle the bundle shipped with the package
(pgesam_engine/bundles/default) is used when there is one.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from .audio import AudioError, list_devices, open_backend, write_wav_atomic
from .bundle import (AUTO_VARIANT, CPU_STEP_THREADS, CPU_VARIANT, Bundle, BundleError, cuda_unusable_reason,
                     default_bundle_path, resolve_providers)
from .engine import Engine, EngineConfig, EngineError
from .synth import STEP_MODES, Synth, SynthError

EXPECTED = (BundleError, EngineError, SynthError, AudioError, OSError, ValueError)


class Group(click.Group):
    """Turns the errors a user can act on into one-line messages with exit status 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EXPECTED as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def bundle_options(f: Callable) -> Callable:
    """--bundle, --provider, --threads, --step-threads, --step, --cuda-graph, --variant."""
    opts = [
        click.option("--bundle", "bundle_path", type=click.Path(path_type=Path), default=None,
                     help="model bundle folder (default: the one shipped with pgesam)"),
        click.option("--provider", default="auto", show_default=True,
                     help="onnxruntime providers in order: auto (CUDA then CPU), cpu, cuda, or a list 'cuda,cpu'"),
        click.option("--threads", type=click.IntRange(1, 64), default=None, help="intra-op threads per session"),
        click.option("--step-threads", type=click.IntRange(1, 64), default=None,
                     help="intra-op threads of the decoder step on CPU (default 1: faster than more at these "
                          "sizes; prerendering runs one worker per core instead)"),
        click.option("--step", type=click.Choice(STEP_MODES), default="auto", show_default=True,
                     help="decoder step: growing cache (dynamic) or preallocated (static; default on CUDA)"),
        click.option("--cuda-graph", is_flag=True, help="capture the static decoder step as CUDA graphs"),
        click.option("--variant", default=AUTO_VARIANT, show_default=True,
                     help=f"quantised graphs listed in the manifest (int8, fp16), 'none' for the float graphs, or "
                          f"auto: {CPU_VARIANT} on CPU when the bundle has it, the float graphs otherwise"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_synth(bundle_path: Path | None, provider: str, threads: int | None, step_threads: int | None, step: str,
               cuda_graph: bool, variant: str | None) -> Synth:
    root = bundle_path if bundle_path is not None else default_bundle_path()
    variant = None if variant in (None, "none") else variant
    bundle = Bundle(root, providers=provider, threads=threads, variant=variant, cuda_graph=cuda_graph,
                    step_threads=step_threads)
    return Synth(bundle, step_mode=step)


def with_synth(f: Callable) -> Callable:
    """Replace the bundle options by a loaded `synth` argument."""
    @bundle_options
    @functools.wraps(f)
    def wrapper(bundle_path: Path | None, provider: str, threads: int | None, step_threads: int | None, step: str,
                cuda_graph: bool, variant: str | None, **kwargs: object) -> object:
        return f(load_synth(bundle_path, provider, threads, step_threads, step, cuda_graph, variant), **kwargs)
    return wrapper


@click.group(cls=Group)
@click.version_option(__version__, prog_name="pgesam")
@click.option("-v", "--verbose", count=True, help="log more (-v info, -vv debug)")
def cli(verbose: int) -> None:
    """pGESAM-RT: pitch-conditioned instrument sounds from a 2-D timbre map, in real time."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _write(path: Path, audio: np.ndarray, sr: int) -> None:
    """Atomically: a killed render leaves no file or a whole one under `path`, never a partial WAV."""
    write_wav_atomic(path, audio, sr)


def _read_batch(file: Path, out: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Path]]:
    """CSV with a header: x,y,pitch[,velocity][,path] -> points (N, 2), pitches, velocities, output paths."""
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"x", "y", "pitch"} <= set(rows[0]):
        raise click.ClickException(f"{file} needs a header with at least x,y,pitch (optional velocity,path)")
    try:
        points = np.array([[float(r["x"]), float(r["y"])] for r in rows])
        pitches = np.array([int(float(r["pitch"])) for r in rows])
        vel = np.array([float(r.get("velocity") or 127) for r in rows])
    except ValueError as e:
        raise click.ClickException(f"{file}: {e}") from e
    folder = out or Path(".")
    paths = [Path(r["path"]) if r.get("path") else folder / f"note_{i:04d}_{p}.wav"
             for i, (r, p) in enumerate(zip(rows, pitches))]
    return points, pitches, vel, paths


@cli.command()
@with_synth
@click.option("--x", type=float, default=0.0, show_default=True, help="timbre point x")
@click.option("--y", type=float, default=0.0, show_default=True, help="timbre point y")
@click.option("--pitch", type=int, default=60, show_default=True, help="MIDI pitch")
@click.option("--velocity", type=click.FloatRange(1, 127), default=127, show_default=True)
@click.option("--grid", is_flag=True, help="every pitch of the timbre; -o is then a folder")
@click.option("--batch", "batch_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV of notes: x,y,pitch[,velocity][,path]; -o is the folder for rows without a path")
@click.option("--allow-outside", is_flag=True, help="use points off the covered region as given")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="WAV file (or folder)")
def render(synth: Synth, x: float, y: float, pitch: int, velocity: float, grid: bool, batch_file: Path | None,
           allow_outside: bool, out: Path | None) -> None:
    """Render notes to WAV files (float32 at the bundle's sample rate)."""
    from .voices import velocity_gain
    m = synth.m
    if batch_file is not None:
        points, pitches, vels, paths = _read_batch(batch_file, out)
    else:
        cx, cy, moved = m.map.clamp(x, y, allow_outside)
        if moved:
            click.echo(f"({x}, {y}) is off the covered region: clamped to ({cx:.3f}, {cy:.3f})", err=True)
        pitches = np.arange(m.pitch_min, m.pitch_max + 1) if grid else np.array([pitch])
        points = np.tile([cx, cy], (len(pitches), 1))
        vels = np.full(len(pitches), velocity)
        folder = out or Path("grid" if grid else ".")
        paths = [folder / f"pitch_{p}.wav" for p in pitches] if grid else [out or Path("note.wav")]
    if batch_file is not None and not allow_outside:
        points = np.array([m.map.clamp(px, py)[:2] for px, py in points])
    synth.conditions(points, pitches)  # refuse a bad row before writing anything
    for p in {p.parent for p in paths}:
        p.mkdir(parents=True, exist_ok=True)
    batch = 25  # notes rendered together; each batch is written before the next starts (bounded memory)
    with click.progressbar(length=len(pitches), label="rendering", file=sys.stderr) as bar:
        for i in range(0, len(pitches), batch):
            audio = synth.render(points[i:i + batch], pitches[i:i + batch], batch_size=batch)
            for a, v, path in zip(audio, vels[i:i + batch], paths[i:i + batch]):
                _write(path, a * velocity_gain(v), m.sample_rate)
            bar.update(len(audio))
    click.echo(f"wrote {len(paths)} note(s): {paths[0]}{' ...' if len(paths) > 1 else ''}")


@cli.command()
@with_synth
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but loopback needs --allow-remote")
@click.option("--allow-remote", is_flag=True, help="really listen on an address other machines can reach")
@click.option("--allow", "allow", default=None, metavar="ADDRESSES",
              help="only these senders (comma-separated addresses, networks or host names); others are dropped")
@click.option("--port", type=click.IntRange(0, 65535), default=57130, show_default=True, help="UDP port (0: any)")
@click.option("--audio", "audio_spec", default="sounddevice", show_default=True,
              help="sounddevice, null, or file:PATH (record the performance to WAV)")
@click.option("--device", default=None, help="sounddevice output device (index or name)")
@click.option("--blocksize", type=int, default=256, show_default=True, help="audio block in samples")
@click.option("--voices", type=click.IntRange(1, 256), default=16, show_default=True, help="polyphony")
@click.option("--cache-mb", type=click.FloatRange(0), default=256.0, show_default=True,
              help="memory for prerendered timbres")
@click.option("--allow-outside", is_flag=True, help="do not clamp timbre points onto the covered region")
@click.option("--out-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("."),
              show_default=True, help="/pgesam/render writes only inside this folder")
@click.option("--in-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("."),
              show_default=True, help="/pgesam/encode reads only inside this folder")
@click.option("--audio-fallback/--no-audio-fallback", default=True, show_default=True,
              help="play on silently (null backend) when the audio device fails to open or goes away")
@click.option("--reply-port", type=click.IntRange(1, 65535), default=None,
              help="send replies to this port of the sender's host (Max: [udpreceive N]); default: the sender's port")
@click.option("--duration", type=float, default=None, help="stop after this many seconds")
def serve(synth: Synth, host: str, allow_remote: bool, allow: str | None, port: int, audio_spec: str,
          device: str | None, blocksize: int, voices: int, cache_mb: float, allow_outside: bool, out_dir: Path,
          in_dir: Path, audio_fallback: bool, reply_port: int | None, duration: float | None) -> None:
    """Play the instrument, controlled over OSC (UDP). SIGINT or SIGTERM stop it cleanly."""
    from .osc import Router
    from .osc_server import OscServer
    _refuse_remote(host, allow_remote, "listen", "--allow-remote (and --allow ADDRESSES)")  # before any device
    backend = _open_audio(audio_spec, synth.m.sample_rate, blocksize, device, audio_fallback)
    config = EngineConfig(max_voices=voices, cache_mb=cache_mb, allow_outside=allow_outside,
                          output_dir=str(out_dir.resolve()), input_dir=str(in_dir.resolve()),
                          audio_fallback=audio_fallback)
    engine = Engine(synth, backend, config)

    def announce(server: OscServer) -> None:
        if engine.audio_fallback:
            click.echo(f"warning: audio {engine.audio_fallback}; playing on the null backend (no sound)", err=True)
        if synth.bundle.fallback:
            click.echo(f"warning: {synth.bundle.fallback}; running on CPU", err=True)
        h, p = server.address
        click.echo(f"pgesam listening on {h}:{p} (OSC/UDP); provider {synth.bundle.provider} "
                   f"({synth.bundle.variant or 'float'} graphs), audio {engine.backend.describe()}")
    _run_until_stopped(engine, lambda: OscServer(Router(engine), host, port, allow_remote=allow_remote, allow=allow,
                                                 warn=lambda m: click.echo(f"warning: {m}", err=True),
                                                 reply_port=reply_port), announce, duration)
    left = [t.name for t in threading.enumerate() if t.name.startswith("pgesam") and t.is_alive()]
    if left:
        click.echo(f"warning: threads still running at exit: {', '.join(left)}", err=True)
    click.echo(f"stopped; underruns {engine.backend.underruns}, late bundles {engine.scheduler.late}")


def _open_audio(spec: str, sample_rate: int, blocksize: int, device: str | None, fallback: bool) -> object:
    """The backend `spec` names; an unusable sound device (no PortAudio, no device) becomes null when allowed."""
    dev = int(device) if device is not None and device.isdigit() else device
    try:
        return open_backend(spec, sample_rate, blocksize, dev)
    except AudioError as e:
        if spec != "sounddevice" or not fallback:
            raise
        click.echo(f"warning: {e}; playing on the null backend (no sound)", err=True)
        return open_backend("null", sample_rate, blocksize)


def _refuse_remote(host: str, allow_remote: bool, what: str, flags: str) -> None:
    """A clear refusal to `what` on an address other machines can reach, unless --allow-remote was given."""
    from .osc_server import is_loopback
    if not allow_remote and not is_loopback(host):
        raise click.ClickException(f"refusing to {what} on {host}: other machines could reach it; pass {flags} "
                                   "or use --host 127.0.0.1")


def _run_until_stopped(engine: Engine, make_server: Callable[[], Any], announce: Callable[[Any], None],
                       duration: float | None) -> None:
    """Open the server, start the engine, announce, serve until stopped; always stop both again."""
    server = None
    try:
        server = make_server()
        engine.start()
        announce(server)
        sys.stdout.flush()
        _serve_until_stopped(server, duration)
    finally:
        if server is not None:
            server.stop()
        engine.close()


def _serve_until_stopped(server: object, duration: float | None) -> None:
    """Run `server` until SIGINT/SIGTERM (or `duration` seconds), then give the signal handlers back."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        stop.wait(duration)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@cli.command()
@with_synth
@click.argument("audio_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-k", "--nearest", "k", type=click.IntRange(1, 100), default=3, show_default=True)
def encode(synth: Synth, audio_file: Path, k: int) -> None:
    """Place an audio file on the timbre map: its point, pitch and nearest training instruments."""
    import soundfile
    try:
        audio, sr = soundfile.read(str(audio_file), dtype="float32")
    except RuntimeError as e:
        raise click.ClickException(f"cannot read {audio_file}: {e}") from e
    enc = synth.encode_audio(audio, sr, k)
    click.echo(f"x {enc.x:.4f}  y {enc.y:.4f}  pitch {enc.pitch}")
    for inst, dist in enc.nearest:
        click.echo(f"  {dist:.3f}  {inst['name']}  ({inst.get('family', '')}, {inst.get('preset', '')})")


@cli.command()
@bundle_options
def info(bundle_path: Path | None, provider: str, threads: int | None, step_threads: int | None, step: str,
         cuda_graph: bool, variant: str | None) -> None:
    """The bundle, onnxruntime's providers, and the audio devices."""
    import onnxruntime as ort
    click.echo(f"pgesam {__version__}, onnxruntime {ort.__version__}")
    click.echo(f"available providers: {', '.join(ort.get_available_providers())}")
    click.echo(f"CUDA: {cuda_unusable_reason() or 'usable'}")
    click.echo(f"requested: {', '.join(resolve_providers(provider))}")
    click.echo("audio devices:\n" + list_devices())
    synth = load_synth(bundle_path, provider, threads, step_threads, step, cuda_graph, variant)
    m = synth.m
    click.echo(f"bundle: {synth.bundle.root} (version {m.raw['version']}, {m.raw.get('created_by', '?')})")
    click.echo(f"  {m.sample_rate} Hz, {m.frames} frames of {m.hop} samples, MIDI {m.pitch_min}-{m.pitch_max}, "
               f"{len(m.map.instruments)} instruments on the map, step {synth.step_mode}, "
               f"graphs {synth.bundle.variant or 'float'}")
    for name, provs in synth.bundle.providers.items():
        click.echo(f"  {name:22s} {provs[0]}")


@cli.command()
@with_synth
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--repeats", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--notes", type=click.IntRange(5, 2000), default=100, show_default=True,
              help="OSC note-ons for the latency figure")
@click.option("--torch/--no-torch", "with_torch", default=True, show_default=True,
              help="also time the torch uncached reference when pgesam_train is installed")
def bench(synth: Synth, as_json: bool, repeats: int, notes: int, with_torch: bool) -> None:
    """Latencies and speeds of this bundle on this machine."""
    from .bench import markdown, run_bench
    report = run_bench(synth, repeats=repeats, notes=notes, with_torch=with_torch,
                       log=lambda s: click.echo(s, err=True))
    b = synth.bundle
    report["command"] = (f"pgesam bench --json --repeats {repeats} --notes {notes}"
                         + (f" --threads {b.threads}" if b.threads else "")
                         + (f" --step-threads {b.step_threads}" if b.step_threads != CPU_STEP_THREADS else "")
                         + ("" if with_torch else " --no-torch"))
    click.echo(json.dumps(report, indent=2) if as_json else markdown(report))


@cli.command("web")
@with_synth
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (the page has no login); anything but loopback needs --allow-remote")
@click.option("--allow-remote", is_flag=True, help="really serve on an address other machines can reach")
@click.option("--port", type=click.IntRange(0, 65535), default=8130, show_default=True, help="TCP port (0: any)")
@click.option("--audio", "audio_spec", default="null", show_default=True,
              help="also play the page's notes on the engine's output: sounddevice or file:PATH (null: browser only)")
@click.option("--cache-mb", type=click.FloatRange(0), default=256.0, show_default=True,
              help="memory for prerendered timbres")
@click.option("--allow-outside", is_flag=True, help="do not clamp timbre points onto the covered region")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1024), default=20.0, show_default=True,
              help="largest audio file the page may upload")
@click.option("--duration", type=float, default=None, help="stop after this many seconds")
def web_page(synth: Synth, host: str, allow_remote: bool, port: int, audio_spec: str, cache_mb: float,
             allow_outside: bool, max_upload_mb: float, duration: float | None) -> None:
    """Serve the timbre map as a web page: click a timbre, play keys (needs the `web` extra: aiohttp)."""
    from .osc_server import is_loopback
    _refuse_remote(host, allow_remote, "serve the page (it has no login)", "--allow-remote")
    try:
        from .web.server import WebServer
    except ImportError as e:
        raise click.ClickException(f"`pgesam web` needs aiohttp: pip install 'pgesam-rt[web]' ({e})") from e
    from .web.api import WebApi, WebConfig
    backend = open_backend(audio_spec, synth.m.sample_rate)
    engine = Engine(synth, backend, EngineConfig(cache_mb=cache_mb, allow_outside=allow_outside))

    def announce(server: WebServer) -> None:
        if not is_loopback(host):
            click.echo(f"warning: serving on {host}: anyone who can reach it can use the page", err=True)
        click.echo(f"pgesam web page at {server.url} ; provider {synth.bundle.provider}, audio {backend.describe()}")
    _run_until_stopped(engine, lambda: WebServer(WebApi(engine, WebConfig(max_upload_mb=max_upload_mb,
                                                                          mirror=audio_spec != "null")), host, port),
                       announce, duration)


def main(argv: list[str] | None = None) -> None:
    """Console entry point `pgesam`."""
    cli.main(args=argv, prog_name="pgesam")
