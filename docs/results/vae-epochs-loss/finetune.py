"""Continue a trained VAE at gamma = 1 (every scheduled term at its final weight) with overrides, printing
Table-5 ratios every 5 epochs: python finetune.py CHECKPOINT NAME EPOCHS field=value ...

The session-11 diagnosis (docs/report-notes.md, VAE structure) ran it on checkpoints/small/vae.pt, 20 epochs,
one thread, fresh AdamW moments: which terms hold the map together and which keep V_inst up. Writes
$PGESAM_HOME/runs/vae-finetune/NAME.json.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
import torch

from arm import CACHE, variances, with_overrides
from pgesam_train.data.latents import load_latents
from pgesam_train.paths import home
from pgesam_train.train_vae import learning_rate, run_batch, split_data
from pgesam_train.vae import load_vae


def main() -> None:
    torch.set_num_threads(1)
    checkpoint, name, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, extra = load_vae(checkpoint)
    cfg, _, _ = with_overrides(model.config, sys.argv[4:])
    cfg = model.config = dataclasses.replace(cfg, epochs=epochs)
    for m in model.modules():  # the dropout layers were built with the checkpoint's rate
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    data = split_data(load_latents(CACHE, "train"), cfg, extra["classes"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    rng, t0, log = np.random.default_rng(cfg.seed), time.time(), []
    for epoch in range(epochs + 1):
        if epoch % 5 == 0 or epoch == epochs:
            res = variances(model.eval())
            log.append({"epoch": epoch, "seconds": round(time.time() - t0), **res})
            print(name, epoch, "train", [round(r, 1) for r in res["train"]["ratio"]], "V_inst",
                  [f"{v:.2e}" for v in res["train"]["v_inst"]], "V_pitch", [f"{v:.3f}" for v in res["train"]["v_pitch"]],
                  "test", [round(r, 1) for r in res["test"]["ratio"]], flush=True)
        if epoch == epochs:
            break
        model.train()
        order = rng.permutation(len(data))
        for s in range(0, len(order), cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, (epoch + s / len(order)) / epochs)
            total, _, _ = run_batch(model, data, order[s:s + cfg.batch_size], 1.0)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
    out = home() / "runs/vae-finetune"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"checkpoint": checkpoint, "overrides": sys.argv[4:], "log": log}))


if __name__ == "__main__":
    main()
