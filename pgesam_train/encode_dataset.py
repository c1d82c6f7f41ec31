"""`pgesam-train dataset encode`: every note of every split through a codec's encoder into the latent cache.

16 kHz NSynth-format notes are resampled to the codec's rate with soxr (4 s -> 96,000 samples -> 300 frames at the
defaults) and written with `pgesam_train.data.latents.LatentWriter`, which records the codec's identity
(`codec_id`) and refuses to mix codecs in one cache.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from .codec import Codec, codec_id, frames_for, resample
from .data.latents import LatentWriter
from .data.nsynth import SPLITS, DatasetError, Note, load_audio, load_split

DATASET_SR = 16000


def _note_entry(n: Note) -> dict:
    return {"note_str": n.note_str, "pitch": n.pitch, "instrument": n.instrument,
            "instrument_str": n.instrument_str, "family": n.family}


def _note_frames(note: Note, codec: Codec) -> int:
    """Frames of one note after resampling to the codec's rate (every note of a split must match it)."""
    return frames_for(round(sf.info(str(note.audio_path)).frames * codec.sample_rate / DATASET_SR), codec.hop)


def encode_split(dataset_dir: Path, cache_dir: Path, codec: Codec, split: str, identity: dict,
                 batch_size: int = 16, progress: bool = True) -> int:
    """Encode one split into `cache_dir`; returns the number of notes."""
    notes = load_split(dataset_dir, split)
    frames = _note_frames(notes[0], codec) if notes else 0
    writer = LatentWriter(cache_dir, split, identity, str(dataset_dir), len(notes), codec.dim, frames)
    bar = tqdm(total=len(notes), disable=not progress, desc=f"encode {split}", unit="note")
    for b in range(0, len(notes), batch_size):
        batch = notes[b:b + batch_size]
        audio = [resample(load_audio(n, DATASET_SR), DATASET_SR, codec.sample_rate) for n in batch]
        bad = [n.note_str for n, a in zip(batch, audio) if frames_for(len(a), codec.hop) != frames]
        if bad:
            raise DatasetError(f"{split}: notes {bad[:3]} differ in length from the split's first note "
                               f"({frames} frames); all notes of a dataset must be equally long")
        with torch.inference_mode():
            emb = codec.encode(torch.from_numpy(np.stack(audio)), sample_rate=codec.sample_rate).numpy()
        for i, n in enumerate(batch):
            writer.put(b + i, emb[i], _note_entry(n))
        bar.update(len(batch))
    bar.close()
    writer.close()
    return len(notes)


def encode_dataset(dataset_dir: Path, cache_dir: Path, codec: Codec, splits: tuple[str, ...] = SPLITS,
                   batch_size: int = 16, progress: bool = True) -> dict:
    """Encode every note of `splits` of an NSynth-format dataset into a latent cache.

    Args:
        dataset_dir: NSynth-format folder (nsynth-{split}/examples.json + audio/).
        cache_dir: the latent cache folder (created; a cache of another codec there is refused).
        codec: any `Codec`, in eval mode.
    Returns:
        {"cache_dir", "codec": codec name, "notes": {split: n}, "seconds", "notes_per_second"}.
    """
    codec.eval()
    identity = codec_id(codec)
    t0 = time.monotonic()
    counts = {split: encode_split(Path(dataset_dir), Path(cache_dir), codec, split, identity, batch_size, progress)
              for split in splits}
    seconds = time.monotonic() - t0
    return {"cache_dir": str(cache_dir), "codec": identity["name"], "notes": counts, "seconds": seconds,
            "notes_per_second": sum(counts.values()) / max(seconds, 1e-9)}
