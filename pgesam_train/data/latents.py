"""The latent cache: every note of a dataset encoded once by one codec, read by the VAE and the Transformer.

Layout of a cache folder:
    meta.json        {"format": 1, "codec": {...codec identity...}, "dataset": str, "dim": 128, "frames": 300}
    {split}.npy      float16 array (N, dim, frames), memory-mapped on read
    {split}.json     {"notes": [{note_str, pitch, instrument, instrument_str, family}, ...]} in array order

A cache records which codec produced it; writing into a folder made by another codec is refused, so latents of
two codecs are never mixed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..reports import write_text_atomically

FORMAT = 1


def same_encoder(a: dict | None, b: dict | None) -> bool:
    """Do two `codec_id` dicts give the same embeddings? (Old identities without encoder_sha256: whole weights.)"""
    if a is None or b is None:
        return False
    key = "encoder_sha256" if "encoder_sha256" in a and "encoder_sha256" in b else "weights_sha256"
    return a.get(key) == b.get(key)


class LatentCacheError(ValueError):
    """A latent cache is missing, incomplete, or belongs to another codec."""


@dataclass
class Latents:
    """One split of a latent cache. `emb` is (N, dim, frames); the other arrays are (N,)."""
    emb: np.ndarray
    pitch: np.ndarray  # MIDI, int64
    instrument: np.ndarray  # dataset instrument id, int64
    family: np.ndarray  # 0..10, int64
    note_str: list[str]
    instrument_str: list[str]
    meta: dict

    def __len__(self) -> int:
        return len(self.note_str)


def read_meta(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise LatentCacheError(f"no latent cache at {cache_dir}: run `pgesam-train dataset encode` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise LatentCacheError(f"{path}: cache format {meta.get('format')}, this version reads {FORMAT}")
    return meta


def load_latents(cache_dir: Path, split: str) -> Latents:
    """Memory-map one split of a latent cache."""
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    arr_path, idx_path = cache_dir / f"{split}.npy", cache_dir / f"{split}.json"
    if not arr_path.is_file() or not idx_path.is_file():
        raise LatentCacheError(f"latent cache {cache_dir} has no complete split {split!r}")
    emb = np.load(arr_path, mmap_mode="r")
    notes = json.loads(idx_path.read_text())["notes"]
    if len(notes) != emb.shape[0]:
        raise LatentCacheError(f"{arr_path}: {emb.shape[0]} rows but {len(notes)} index entries")
    return Latents(emb=emb, pitch=np.array([n["pitch"] for n in notes], dtype=np.int64),
                   instrument=np.array([n["instrument"] for n in notes], dtype=np.int64),
                   family=np.array([n["family"] for n in notes], dtype=np.int64),
                   note_str=[n["note_str"] for n in notes], instrument_str=[n["instrument_str"] for n in notes],
                   meta=meta)


class LatentWriter:
    """Writes one split of a cache row by row, then renames into place (no half-written split is ever read).

    Args:
        cache_dir: the cache folder.
        codec: a JSON-ready dict that identifies the codec (name, config, checkpoint hash).
        n, dim, frames: the array shape (N, dim, frames).
    """

    def __init__(self, cache_dir: Path, split: str, codec: dict, dataset: str, n: int, dim: int, frames: int):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._claim(codec, dataset, dim, frames)
        self.split = split
        self._tmp = self.dir / f".{split}.npy.partial"
        self.emb = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float16, shape=(n, dim, frames))
        self.notes: list[dict] = [{}] * n

    def _claim(self, codec: dict, dataset: str, dim: int, frames: int) -> None:
        meta_path = self.dir / "meta.json"
        meta = {"format": FORMAT, "codec": codec, "dataset": dataset, "dim": dim, "frames": frames}
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if not same_encoder(old.get("codec"), codec) or old.get("dim") != dim or old.get("frames") != frames:
                raise LatentCacheError(f"{self.dir} holds latents of another codec ({old.get('codec', {}).get('name')}); "
                                       "refusing to mix codecs: choose another --out or delete that cache")
            return
        write_text_atomically(meta_path, json.dumps(meta, indent=1))

    def put(self, i: int, emb: np.ndarray, note: dict) -> None:
        """Store row i: emb (dim, frames) and its index entry."""
        self.emb[i] = emb
        self.notes[i] = note

    def close(self) -> None:
        if any(not n for n in self.notes):
            raise LatentCacheError(f"split {self.split}: some rows were never written")
        self.emb.flush()
        del self.emb
        os.replace(self._tmp, self.dir / f"{self.split}.npy")
        write_text_atomically(self.dir / f"{self.split}.json", json.dumps({"notes": self.notes}))


