"""Test-split torchcrepe pitch of free-running notes for one Transformer checkpoint (same notes for every ckpt).

The probe behind docs/results/low-dims-ab (see REPORT.md): python docs/results/low-dims-ab/probe.py CKPT 96 OUT.json
An optional fourth argument picks another split (valid: for choosing checkpoints without looking at test notes).
"""
import json, sys, time, numpy as np, torch
from pgesam_train.transformer import load_transformer
from pgesam_train.vae import load_vae
from pgesam_train.data.latents import load_latents
from pgesam_train.codec import load_codec
from pgesam_train.evaluate_transformer import pick, generate_notes, audio_pitch, vae_pitch_accuracy
from pgesam_train.train_transformer import vae_posterior
from pgesam_train.paths import home
torch.set_num_threads(1)
ckpt, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]  # checkpoint, test notes (a fixed draw, seed 1), JSON out
split = sys.argv[4] if len(sys.argv) > 4 else 'test'
H = str(home())
model = load_transformer(ckpt)[0].eval()
vae = load_vae(f'{H}/checkpoints/vae/small/vae.pt')[0]
lat = load_latents(f'{H}/latents/soundfonts-default--mel-bc8e7863e72c', split)
idx = pick(len(lat), n, 1)
emb = np.asarray(lat.emb[idx], dtype=np.float32); pitch = torch.from_numpy(lat.pitch[idx].astype(np.int64))
mu, _ = vae_posterior(vae, lat.emb[idx])
t = time.time(); gen = generate_notes(model, mu, pitch, 48); tg = time.time() - t
codec = load_codec(f'{H}/checkpoints/codec/small/stft.pt')
r = audio_pitch(codec, gen, pitch)
r['vae_pitch_acc'] = vae_pitch_accuracy(vae, gen, pitch); r['gen_s'] = tg; r['ckpt'] = ckpt; r['split'] = split
json.dump(r, open(out, 'w'))
print(ckpt, 'crepe within50', r['within_50c'], 'vae', r['vae_pitch_acc'], 'voiced', r['voiced'], 'gen_s', round(tg))
