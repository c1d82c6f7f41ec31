"""Per-note gradient of each weighted Eq.-1 term on mu at gamma = 1: python gradients.py CHECKPOINT.

Prints, per term and in train (dropout on) and eval mode, the RMS norm of d(beta * term)/d(mu_i) over four
random batches of the training split, and of its part that differs between notes of one instrument (the part
that can spread an instrument's notes; the rest moves the instrument as a whole).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from arm import CACHE
from pgesam_train.data.latents import load_latents
from pgesam_train.losses import loss_terms, term_weights
from pgesam_train.train_vae import split_data
from pgesam_train.vae import load_vae


def main() -> None:
    torch.set_num_threads(1)
    model, extra = load_vae(sys.argv[1])
    cfg = model.config
    data = split_data(load_latents(CACHE, "train"), cfg, extra["classes"])
    weights, rng = term_weights(cfg.loss, 1.0), np.random.default_rng(0)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        sums: dict[str, np.ndarray] = {}
        for _ in range(4):
            emb, pitch, inst, fam = data.batch(rng.permutation(len(data))[:cfg.batch_size])
            x = model.normalize(emb)
            out = model.forward_normalized(x)
            terms = loss_terms(out, x, out["recon"], pitch, inst, fam, cfg.loss)
            for k, t in terms.items():
                g, = torch.autograd.grad(weights[k] * t, out["mu"], retain_graph=True, allow_unused=True)
                if g is None or not weights[k]:
                    continue  # the pitch head does not read mu
                g, lab = g.numpy(), inst.numpy()
                within = g - np.stack([g[lab == lab[i]].mean(0) for i in range(len(lab))])
                sums[k] = sums.get(k, 0) + np.array([np.sqrt((g ** 2).sum(1).mean()),
                                                     np.sqrt((within ** 2).sum(1).mean())]) / 4
        print(mode, {k: f"{v[0]:.2e} (within instrument {v[1]:.2e})" for k, v in sums.items()})


if __name__ == "__main__":
    main()
