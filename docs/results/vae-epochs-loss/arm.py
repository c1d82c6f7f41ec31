"""One VAE arm at the small preset: python arm.py NAME EPOCHS field=value ... -> Table-5 variances (train, test).

A field of VAEConfig (batch_size, lr, lr_final, dropout, ...) overrides the config, any other field the loss
config (beta_nei, margin, use_inst, ...). Writes $PGESAM_HOME/runs/vae-nei/NAME/{vae.pt,variance.json}.
The arms of docs/results/vae-epochs-loss (REPORT.md, VAE structure): base 30, inst4 30 beta_inst=0.48,
kl4 30 beta_kl=0.000975, nei4 30 beta_nei=2.4, base200 200, nei4-200 200 beta_nei=2.4; one torch thread each,
base400 400 on two. Session 10: b64-30 30 batch_size=64, b32-30 30 batch_size=32, b16-30 30 batch_size=16,
b32-lr3-30 30 batch_size=32 lr=0.003, b32-300-cos 300 batch_size=32 lr_final=0.1, b64-300-cos 300 batch_size=64
lr_final=0.1; one thread each, two at a time. Session 11: do0-30 30 dropout=0, wd0-30 30 weight_decay=0,
do0-noinst-30 30 dropout=0 use_inst=0, do0-nei4-30 30 dropout=0 beta_nei=2.4, and the runs named in
docs/report-notes.md.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from pgesam_train.config import VAEConfig
from pgesam_train.data.latents import load_latents
from pgesam_train.evaluate_vae import variance_analysis
from pgesam_train.paths import home

CACHE = home() / "latents/soundfonts-default--mel-bc8e7863e72c"


def with_overrides(cfg: VAEConfig, args: list[str]) -> tuple[VAEConfig, dict, dict]:
    """cfg with field=value overrides, each typed as the field it replaces -> (cfg, config fields, loss fields)."""
    given = dict(a.split("=", 1) for a in args)
    fields = {f.name for f in dataclasses.fields(VAEConfig)}

    def typed(owner, k: str, v: str):
        kind = type(getattr(owner, k))
        return bool(float(v)) if kind is bool else kind(float(v))

    top = {k: typed(cfg, k, v) for k, v in given.items() if k in fields}
    loss = {k: typed(cfg.loss, k, v) for k, v in given.items() if k not in fields}
    return dataclasses.replace(cfg, **top, loss=dataclasses.replace(cfg.loss, **loss)), top, loss


def variances(model) -> dict:
    """Table 5 (V_inst, V_pitch, their ratio per axis) of `model` on the train and test splits of CACHE."""
    from pgesam_train.train_vae import latent_means
    res = {}
    for split in ("train", "test"):
        lat = load_latents(CACHE, split)
        res[split] = variance_analysis(latent_means(model, lat.emb), np.array(lat.instrument_str), lat.pitch)
    return res


def main() -> None:
    from pgesam_train.config import vae_preset
    from pgesam_train.train_vae import train_vae
    from pgesam_train.vae import load_vae
    name, epochs = sys.argv[1], int(sys.argv[2])
    cfg, top, loss = with_overrides(dataclasses.replace(vae_preset("small"), epochs=epochs), sys.argv[3:])
    out = home() / "runs/vae-nei" / name
    ckpt = train_vae(cfg, CACHE, out, True, 1, False)
    res = {**variances(load_vae(ckpt)[0]), "loss_overrides": loss, "config_overrides": top, "epochs": epochs}
    (out / "variance.json").write_text(json.dumps(res, indent=1))
    print(name, json.dumps(res))


if __name__ == "__main__":
    main()
