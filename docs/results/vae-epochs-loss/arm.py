"""One VAE arm at the small preset: python arm.py NAME EPOCHS field=value ... -> Table-5 variances (train, test).

A field of VAEConfig (batch_size, lr, lr_final, ...) overrides the config, any other field the loss config.
The arms of docs/results/vae-epochs-loss (REPORT.md, VAE structure): base 30, inst4 30 beta_inst=0.48,
kl4 30 beta_kl=0.000975, nei4 30 beta_nei=2.4, base200 200, nei4-200 200 beta_nei=2.4; one torch thread each,
base400 400 on two. Session 10: b64-30 30 batch_size=64, b32-30 30 batch_size=32, b16-30 30 batch_size=16,
b32-lr3-30 30 batch_size=32 lr=0.003, b32-300-cos 300 batch_size=32 lr_final=0.1, b64-300-cos 300 batch_size=64
lr_final=0.1; one thread each, two at a time.
"""
import dataclasses, json, sys
import numpy as np
from pathlib import Path
from pgesam_train.config import VAEConfig, vae_preset
from pgesam_train.train_vae import train_vae, latent_means
from pgesam_train.vae import load_vae
from pgesam_train.evaluate_vae import variance_analysis
from pgesam_train.data.latents import load_latents
from pgesam_train.paths import home
name, epochs = sys.argv[1], int(sys.argv[2])
over = {k: float(v) for k, v in (a.split("=") for a in sys.argv[3:])}
cfg = vae_preset("small")
fields = {f.name for f in dataclasses.fields(VAEConfig)}
top = {k: type(getattr(cfg, k))(v) for k, v in over.items() if k in fields}  # as typed in the preset (int batch)
over = {k: v for k, v in over.items() if k not in top}
cache = home() / "latents/soundfonts-default--mel-bc8e7863e72c"
cfg = dataclasses.replace(cfg, epochs=epochs, **top, loss=dataclasses.replace(cfg.loss, **over))
out = home() / "runs/vae-nei" / name
ckpt = train_vae(cfg, cache, out, True, 1, False)
res = {}
for split in ("train", "test"):
    lat = load_latents(cache, split)
    mu = latent_means(load_vae(ckpt)[0], lat.emb)
    res[split] = variance_analysis(mu, np.array(lat.instrument_str), lat.pitch)
res["loss_overrides"] = over; res["config_overrides"] = top; res["epochs"] = epochs
json.dump(res, open(out / "variance.json", "w"), indent=1)
print(name, json.dumps(res))
