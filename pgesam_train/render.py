"""`pgesam-train render`: the torch reference render, timbre point + MIDI pitch -> codec frames -> 24 kHz WAV.

This is the implementation the realtime engine is compared with: the Transformer generates a note free-running
from <BOS> with the KV cache, the codec decodes it. `--grid` renders all pitches of the model for one timbre
point: one WAV each and a PNG of their spectrograms.

The codec is the one the Transformer's latent cache was encoded with: a Transformer checkpoint records that
codec's identity (weights hash), and `find_codec` looks for a matching codec checkpoint under
$PGESAM_HOME/checkpoints/codec (or builds it, for codecs that need no training).
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from . import paths  # noqa: E402
from .codec import Codec, build_codec, codec_id, find_codec_checkpoint, load_codec, same_encoder  # noqa: E402
from .config import CodecConfig, from_dict  # noqa: E402
from .generate import generate  # noqa: E402
from .transformer import TimbreTransformer  # noqa: E402

log = logging.getLogger(__name__)


def _matches(codec: Codec, identity: dict | None) -> bool:
    """Does `codec` decode the latents `identity` names (same encoder; the decoder may be trained further)?"""
    return identity is None or same_encoder(codec_id(codec), identity)


def find_codec(identity: dict | None, explicit: Path | None = None) -> Codec:
    """The codec to decode a Transformer's frames with.

    Args:
        identity: the `codec_id` dict stored in the Transformer checkpoint (None: unknown).
        explicit: a codec checkpoint to use; a warning is logged when it is not the identified codec.
    """
    if explicit is not None:
        codec = load_codec(explicit)
        if not _matches(codec, identity):
            log.warning("codec %s is not the codec the Transformer's latents came from (%s): expect noise",
                        explicit, identity.get("name"))
        return codec
    if identity is None:
        raise ValueError("the Transformer checkpoint does not say which codec made its latents: pass --codec PATH")
    path = find_codec_checkpoint(identity)
    if path is not None:
        return load_codec(path)
    codec = build_codec(from_dict(CodecConfig, identity["config"])).eval()
    if _matches(codec, identity):  # a codec without trained weights (griffinlim, pretrained encodec, a fresh stft)
        if codec.config.backend == "stft":
            log.warning("no trained decoder for codec %s under %s: decoding with an untrained one (its mel prior "
                        "alone: a one-pass phase vocoder)", identity.get("name"), paths.home() / "checkpoints")
        return codec
    raise ValueError(f"no codec checkpoint matching {identity.get('name')} under "
                     f"{paths.home() / 'checkpoints' / 'codec'}: pass --codec PATH")


@torch.inference_mode()
def render_notes(model: TimbreTransformer, codec: Codec, x: float, y: float, pitches: list[int],
                 batch_size: int = 25) -> np.ndarray:
    """Notes at timbre point (x, y) for each MIDI pitch -> audio (N, frames * hop) float32 at codec.sample_rate."""
    frames = generate(model, x, y, pitches, batch_size=batch_size)  # (N, dim, frames)
    device = next(codec.parameters(), torch.empty(0)).device
    return torch.cat([codec.decode(frames[s:s + 8].to(device)).cpu() for s in range(0, len(frames), 8)]).numpy()


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write mono audio (samples,) as 16-bit PCM, clipped to [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1.0:
        log.warning("%s: peak %.2f clipped to 1.0", path, peak)
    sf.write(path, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def spectrogram_db(audio: np.ndarray, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    """Log-magnitude STFT of (samples,) audio -> (n_fft // 2 + 1, frames) in dB, floored at -100."""
    spec = torch.stft(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), n_fft, hop,
                      window=torch.hann_window(n_fft), return_complex=True).abs()
    return (20 * torch.log10(spec.clamp_min(1e-5))).numpy()


def spectrogram_grid(audio: np.ndarray, pitches: list[int], sample_rate: int, path: Path, title: str) -> Path:
    """A PNG of one spectrogram per note, in a near-square grid, labelled with the MIDI pitch."""
    cols = int(np.ceil(np.sqrt(len(pitches))))
    rows = int(np.ceil(len(pitches) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False, sharex=True,
                             sharey=True)
    for ax, wav, p in zip(axes.flat, audio, pitches):
        ax.imshow(spectrogram_db(wav), origin="lower", aspect="auto", vmin=-80, vmax=20, cmap="magma",
                  extent=(0, len(wav) / sample_rate, 0, sample_rate / 2000))
        ax.set_title(f"MIDI {p}", fontsize=8)
        ax.set_ylim(0, min(8.0, sample_rate / 2000))
    for ax in list(axes.flat)[len(pitches):]:
        ax.axis("off")
    fig.supxlabel("seconds")
    fig.supylabel("kHz")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_grid(model: TimbreTransformer, codec: Codec, x: float, y: float, out_dir: Path) -> list[Path]:
    """Every pitch of the model at (x, y): out_dir/pitch_{midi}.wav and out_dir/grid.png. Returns the paths."""
    cfg = model.config
    pitches = list(range(cfg.pitch_min, cfg.pitch_min + cfg.n_pitches))
    audio = render_notes(model, codec, x, y, pitches)
    out_dir = Path(out_dir)
    wavs = [write_wav(out_dir / f"pitch_{p:03d}.wav", a, codec.sample_rate) for p, a in zip(pitches, audio)]
    png = spectrogram_grid(audio, pitches, codec.sample_rate, out_dir / "grid.png",
                           f"timbre point ({x:+.3f}, {y:+.3f})")
    return wavs + [png]
