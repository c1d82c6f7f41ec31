import dataclasses, sys
from pathlib import Path
from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.codec import KIND, codec_from_state, save_codec
src = Path.home() / ".cache/pgesam/checkpoints/codec/small/stft.pt"
state = load_checkpoint(src, KIND)
for iters in map(int, sys.argv[1:]):
    codec = codec_from_state(state)
    codec2 = type(codec)(dataclasses.replace(codec.config, refine_iters=iters))
    missing = codec2.load_state_dict(codec.state_dict())
    print(iters, missing)
    save_codec(Path(f"/tmp/refine/stft-step10000-refine{iters}.pt"), codec2, step=int(state["step"]))
