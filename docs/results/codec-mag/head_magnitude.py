"""How close the stft decoder head's magnitude (before phase refinement) is to the original's STFT magnitude, beside
the mel prior it starts from (the NNLS inverse of the log-mel), on 8 test notes of the default dataset.

    python docs/results/codec-mag/head_magnitude.py CODEC_CHECKPOINT

Prints the log-magnitude L1 at floors 1e-5 ... 1e-2 (`MagnitudeLoss.FLOOR` is 1e-3), then the error by how loud the
original's bin is. results.md beside this file has what it printed for the shipped codec and the fine-tune.
"""
import sys

import numpy as np
import torch

from pgesam_train import paths
from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.codec import KIND, codec_from_state, resample
from pgesam_train.data.nsynth import load_audio, load_split
from pgesam_train.eval_codec import pick_notes

torch.set_num_threads(1)
codec = codec_from_state(load_checkpoint(sys.argv[1], KIND)).eval()
notes = pick_notes(load_split(paths.dataset_dir("default"), "test"), 8)
x = torch.from_numpy(np.stack([resample(load_audio(n, 16000), 16000, 24000) for n in notes]))
with torch.no_grad():
    emb = codec.encode(x)
    re, im = codec.decoder.spectrum(emb)
    prior = codec.decoder.head.mel_prior(emb)  # log-magnitude (B, F, T)
    true_re, true_im = codec.encoder.stft(x)
head = torch.sqrt(re * re + im * im + 1e-10)
true = torch.sqrt(true_re * true_re + true_im * true_im + 1e-10)
for floor in (1e-5, 1e-4, 1e-3, 1e-2):
    log_true = torch.log(true.clamp(min=floor))
    print(f"floor {floor:g}: head {(torch.log(head.clamp(min=floor)) - log_true).abs().mean():.3f}  "
          f"mel prior {(prior.clamp(min=np.log(floor)) - log_true).abs().mean():.3f}")
log_true, log_head, log_prior = (torch.log(true.clamp(min=1e-5)), torch.log(head.clamp(min=1e-5)),
                                 prior.clamp(min=np.log(1e-5)))
for lo, hi in ((-99, -7), (-7, -4), (-4, -1), (-1, 2), (2, 99)):
    m = (log_true >= lo) & (log_true < hi)
    print(f"original log-magnitude in [{lo}, {hi}): {m.float().mean():.2f} of bins, head error "
          f"{(log_head - log_true)[m].abs().mean():.3f}, mel prior error {(log_prior - log_true)[m].abs().mean():.3f}")
