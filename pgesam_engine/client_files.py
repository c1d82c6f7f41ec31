"""Files named by clients (/pgesam/render, /pgesam/encode, the web page): where they may be, and clear refusals.

`confine` maps a client's path into an allowed folder (or refuses it); `wav_target` and `read_audio` add the checks
of a render target and of an audio file to read. Every refusal is an `EngineError` whose message goes back to the
client; nothing is written here (renders are written atomically by `audio.write_wav_atomic`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EngineError


def clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def confine(path: str, root: str | Path | None, what: str) -> Path:
    """A file path sent by a client -> the file it names; with `root`, only a file inside `root`.

    Relative paths are taken from `root`; `..` is refused; symlinks are followed to where they really lead and
    refused when that is outside `root`. Without `root` the path is used as given (`~` expanded).
    """
    if "\x00" in path:
        raise EngineError(f"{what} path contains a NUL character")
    if root is None:
        return Path(path).expanduser()
    p = Path(path)
    if ".." in p.parts:
        raise EngineError(f"{what} path {clip(path)!r} is refused: it contains '..'")
    base = Path(root).expanduser().resolve()
    try:
        full = (base / p).resolve()  # an absolute p replaces base
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise EngineError(f"{what} path {clip(path)!r} cannot be resolved: {e}") from e
    if not full.is_relative_to(base):
        raise EngineError(f"{what} path {clip(path)!r} is refused: it is (or links to a place) outside the "
                          f"allowed folder {base}; give a path inside it")
    return full


def wav_target(path: str, root: str | Path | None) -> Path:
    """Where /pgesam/render may write `path`: a .wav name in an existing folder (inside `root` when given)."""
    target = confine(path, root, "render")
    if target.suffix.lower() != ".wav":
        raise EngineError(f"cannot write {clip(path)}: the file name must end in .wav")
    if not target.parent.is_dir():
        raise EngineError(f"cannot write {clip(path)}: folder {target.parent} does not exist")
    return target


def read_audio(path: str, root: str | Path | None) -> tuple[np.ndarray, int]:
    """The audio file a client names (inside `root` when given) -> (samples float32, sample rate)."""
    import soundfile
    source = confine(path, root, "encode")
    try:
        found = source.is_file()
    except OSError as e:  # e.g. a name too long
        raise EngineError(f"cannot read {clip(path)}: {e.strerror or e}") from e
    if not found:
        raise EngineError(f"no audio file at {clip(path)}")
    try:
        audio, sr = soundfile.read(str(source), dtype="float32")
    except RuntimeError as e:
        raise EngineError(f"cannot read {clip(path)}: {e}") from e
    return audio, sr
