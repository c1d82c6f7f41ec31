"""The weight average probed as avgA-2400-2600: python average.py OUT.pt CKPT... (plain mean of float tensors)."""
import sys, torch
out, srcs = sys.argv[1], sys.argv[2:]
states = [torch.load(s, map_location="cpu", weights_only=False) for s in srcs]
avg = dict(states[-1]); avg["optimizer"] = None
avg["model"] = {k: (sum(st["model"][k].double() for st in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
                for k, v in states[-1]["model"].items()}
avg["extra"] = {**avg["extra"], "averaged": srcs}
torch.save(avg, out)
