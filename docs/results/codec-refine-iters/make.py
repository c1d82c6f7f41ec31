"""Checkpoints of the shipped stft codec with more phase-refinement iterations at decode time, for `codec eval`.

    python docs/results/codec-refine-iters/make.py OUT_DIR 3 4
    pgesam-train codec eval --checkpoint OUT_DIR/stft-step10000-refine3.pt \
        --checkpoint OUT_DIR/stft-step10000-refine4.pt --checkpoint $PGESAM_HOME/checkpoints/codec/small/stft.pt --limit 64

`PhaseRefine` has no weights, so the trained decoder's weights load unchanged into a config with other
`refine_iters`. results.md beside this file is what the eval printed (2026-12-03).
"""
import dataclasses
import sys
from pathlib import Path

from pgesam_train import paths
from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.codec import KIND, codec_from_state, save_codec

out = Path(sys.argv[1])
state = load_checkpoint(paths.checkpoints_dir("codec", "small") / "stft.pt", KIND)
for iters in map(int, sys.argv[2:]):
    codec = codec_from_state(state)
    refined = type(codec)(dataclasses.replace(codec.config, refine_iters=iters))
    refined.load_state_dict(codec.state_dict())  # strict: every weight has its place
    print(save_codec(out / f"stft-step{state['step']}-refine{iters}.pt", refined, step=int(state["step"])))
