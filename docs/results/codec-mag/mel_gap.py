"""Where a codec's log-mel L1 (the `codec eval` metric) exceeds the Griffin-Lim floor's, on 16 test notes of the
default dataset: by the loudness of the original's frame, then by band group in loud frames.

    python docs/results/codec-mag/mel_gap.py CODEC_CHECKPOINT
"""
import sys

import numpy as np
import torch

from pgesam_train import paths
from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.codec import KIND, build_codec, codec_from_state, resample
from pgesam_train.config import CodecConfig
from pgesam_train.data.nsynth import load_audio, load_split
from pgesam_train.eval_codec import _reconstruct, log_mel, pick_notes

torch.set_num_threads(1)
codecs = {"codec": codec_from_state(load_checkpoint(sys.argv[1], KIND)).eval(),
          "floor": build_codec(CodecConfig(backend="griffinlim", sample_rate=24000))}
notes = pick_notes(load_split(paths.dataset_dir("default"), "test"), 16)
x = torch.from_numpy(np.stack([resample(load_audio(n, 16000), 16000, 24000) for n in notes]))
target = log_mel(x, 24000)  # (B, 128, frames)
error = {name: (log_mel(_reconstruct(c, x), 24000) - target).abs() for name, c in codecs.items()}
level = target.max(1).values  # (B, frames): the frame's loudest band
print("overall: " + "  ".join(f"{name} {e.mean():.4f}" for name, e in error.items()))
for lo, hi in ((-99, -9), (-9, -7), (-7, -5), (-5, -3), (-3, 99)):
    m = (level >= lo) & (level < hi)
    print(f"frames whose loudest band is in [{lo}, {hi}): {int(m.sum())} frames, "
          + "  ".join(f"{name} {e.mean(1)[m].mean():.3f}" for name, e in error.items()))
loud = level >= -3
for lo, hi in ((0, 16), (16, 32), (32, 64), (64, 96), (96, 128)):
    print(f"bands {lo}-{hi}, loud frames: "
          + "  ".join(f"{name} {e[:, lo:hi].mean(1)[loud].mean():.3f}" for name, e in error.items()))
