"""Where the default codec's error comes from: magnitude or phase.

    .venv/bin/python scripts/codec_phase_diagnosis.py [--notes 16] [--dataset DIR] [--checkpoint CKPT]

For `--notes` test notes spread over the split, decodes STFT frames (n_fft 1280, hop 320, the codec's own) built
from a magnitude and a starting phase, after 0, 2, 4, 8 and 32 fast Griffin-Lim iterations (the same iteration as
`PhaseRefine` and the Griffin-Lim floor), and prints the evaluation's mel L1 (`pgesam_train.eval_codec.log_mel`)
of each against the original note. Magnitudes: the true one, the mel prior's (the NNLS inverse of the log-mel
embedding, what the decoder starts from) and, with --checkpoint, a trained decoder's. Phases: the phase vocoder of
`SpectrumHead` (from that magnitude), random, and the trained decoder's own. Writes nothing.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from pgesam_train import paths
from pgesam_train.codec import build_codec, codec_preset, load_codec, resample
from pgesam_train.codecs.stft import PhaseRefine
from pgesam_train.data.nsynth import load_audio, load_split
from pgesam_train.eval_codec import log_mel, pick_notes

ITERS = (0, 2, 4, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", type=int, default=16)
    ap.add_argument("--dataset", type=Path, default=paths.home() / "datasets" / "soundfonts-default")
    ap.add_argument("--checkpoint", type=Path, help="a trained stft codec: also its magnitude and phase")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    notes = pick_notes(load_split(args.dataset, "test"), args.notes)
    x = torch.from_numpy(np.stack([resample(load_audio(n, 16000), 16000, 24000) for n in notes])).float()
    codec = (load_codec(args.checkpoint) if args.checkpoint else build_codec(codec_preset("small"))).eval()
    dec, c = codec.decoder, codec.config
    if c.backend != "stft" or not c.uses_mel_prior:
        raise SystemExit(f"{args.checkpoint}: needs an stft codec with the log-mel encoder and the mel prior")
    refine = PhaseRefine(c, dec.istft) if dec.refine is None else dec.refine
    reference = log_mel(x, c.sample_rate)

    def mel_l1(re: torch.Tensor, im: torch.Tensor) -> float:
        return float((log_mel(dec.istft(re, im), c.sample_rate) - reference).abs().mean())

    def row(label: str, mag: torch.Tensor, phase: torch.Tensor) -> None:
        re, im = mag * torch.cos(phase), mag * torch.sin(phase)
        cells = []
        for k in ITERS:
            refine.iters = k
            cells.append(f"{mel_l1(*refine(re, im)):.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    def vocoder_phase(mag: torch.Tensor) -> torch.Tensor:
        head = dec.head
        log_mag = torch.log(torch.clamp(mag, min=1e-5))
        advance = head._advance(log_mag, torch.zeros_like(log_mag))
        return head._wrap(torch.cumsum(advance, dim=2)).float() + head.window_phase

    with torch.inference_mode():
        emb = codec.encode(x)
        re, im = codec.encoder.stft(x)  # the log-mel encoder's own STFT
        true_mag, true_phase = torch.sqrt(re * re + im * im), torch.atan2(im, re)
        prior_mag = torch.exp(dec.head.mel_prior(emb))
        random = 2 * math.pi * torch.rand(true_mag.shape, generator=torch.Generator().manual_seed(0))
        print(f"{len(notes)} test notes; mel L1 after k fast Griffin-Lim iterations\n")
        print("| magnitude, starting phase | " + " | ".join(f"k = {k}" for k in ITERS) + " |")
        print("|---|" + "---:|" * len(ITERS))
        row("true, true", true_mag, true_phase)
        row("true, phase vocoder", true_mag, vocoder_phase(true_mag))
        row("true, random", true_mag, random)
        row("mel prior, phase vocoder", prior_mag, vocoder_phase(prior_mag))
        row("mel prior, random", prior_mag, random)
        if args.checkpoint:
            d_re, d_im = dec.spectrum(emb)
            row(f"{args.checkpoint.stem}, its own", torch.sqrt(d_re ** 2 + d_im ** 2), torch.atan2(d_im, d_re))


if __name__ == "__main__":
    main()
