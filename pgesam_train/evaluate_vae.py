"""The paper's VAE evaluation on our data: Table 3 (MAE of reconstructed embeddings), Table 4 (pitch 0/1 accuracy
of the VAE's pitch classifier on ground-truth and on VAE-reconstructed embeddings), Table 5 (V_inst and V_pitch
per axis, Eq. 9-10), Table 6 (the same variances for the ablations), written as JSON and Markdown beside the
paper's numbers, and the timbre-map figures.

Reconstruction decodes z = mu with the one-hot of the *ground-truth* pitch (what a player asks for), then feeds
the reconstruction back to the encoder's pitch classifier. The metric functions take numpy arrays.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.config import VAE_ABLATIONS, VAEConfig, from_dict
from pgesam_train.data.latents import Latents, load_latents
from pgesam_train.plots import save_ablation_figure, save_timbre_map
from pgesam_train.reports import write_json_markdown
from pgesam_train.train_vae import latent_means, pitch_classes, timbre_map, train_vae
from pgesam_train.vae import KIND, VAE, load_vae

# The paper's numbers (Tables 3-6), VAE parts only; variances as [x, y].
PAPER = {
    "mae": {"train": 1.14e-3, "test": 1.02e-3},
    "pitch_acc_gt": {"train": 1.00, "test": 0.755},
    "pitch_acc_vae": {"train": 0.112, "test": 6.91e-2},
    "variance": {"train": {"v_inst": [1.13e-7, 1.00e-7], "v_pitch": [0.179, 0.179]},
                 "test": {"v_inst": [2.40e-2, 2.83e-2], "v_pitch": [0.136, 0.123]}},
    "ablation": {"baseline": {"v_inst": [1.13e-7, 1.00e-7], "v_pitch": [0.179, 0.179]},
                 "no_kl": {"v_inst": [2.06e-5, 8.25e-7], "v_pitch": [0.229, 0.286]},
                 "no_reg": {"v_inst": [1.93e-5, 1.49e-4], "v_pitch": [0.189, 0.125]},
                 "no_nei": {"v_inst": [1.22e-4, 9.07e-5], "v_pitch": [2.34e-3, 2.05e-3]},
                 "no_fam": {"v_inst": [1.58e-7, 1.76e-7], "v_pitch": [0.191, 0.173]}},
}
ABLATION_TITLES = {"baseline": "Baseline", "no_kl": "No KL loss", "no_reg": "No reg. loss",
                   "no_nei": "No nei. loss", "no_fam": "No family classifier"}


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference over all elements (Table 3)."""
    return float(np.mean(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def pitch_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """0/1 accuracy (Table 4): the fraction of notes whose predicted pitch equals the target."""
    if len(target) == 0:
        raise ValueError("pitch accuracy of an empty split")
    return float(np.mean(np.asarray(pred) == np.asarray(target)))


def group_variance(mu: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Eq. 9 / 10: per axis, the mean over groups of the within-group population variance (1/N_i).

    Args: mu (N, D) latent means; groups (N,) instrument ids (V_inst) or pitches (V_pitch). Returns (D,).
    """
    mu = np.asarray(mu, dtype=np.float64)
    per_group = [mu[groups == g].var(axis=0) for g in np.unique(groups)]
    if not per_group:
        raise ValueError("variance of an empty split")
    return np.mean(per_group, axis=0)


def variance_analysis(mu: np.ndarray, instrument: np.ndarray, pitch: np.ndarray) -> dict[str, list[float]]:
    """Tables 5-6: V_inst and V_pitch per axis, and V_pitch / V_inst per axis (the disentanglement ratio)."""
    v_inst, v_pitch = group_variance(mu, instrument), group_variance(mu, pitch)
    return {"v_inst": v_inst.tolist(), "v_pitch": v_pitch.tolist(),
            "ratio": (v_pitch / np.maximum(v_inst, 1e-300)).tolist()}


@torch.no_grad()
def evaluate_split(model: VAE, lat: Latents, batch_size: int = 256) -> dict:
    """One pass over a split: mu (N, 2) and the metrics of Tables 3-5.

    Returns {"mu": array, "metrics": {n_notes, n_instruments, mae, mae_normalised, pitch_acc_gt, pitch_acc_vae,
    v_inst, v_pitch, ratio}}.
    """
    model.eval()
    target = pitch_classes(lat.pitch, model.config)
    mus, pred_gt, pred_vae, abs_sum = [], [], [], 0.0
    for s in range(0, len(lat), batch_size):
        emb = torch.from_numpy(np.asarray(lat.emb[s:s + batch_size], dtype=np.float32))  # (B, dim, frames)
        mu, _, logits = model.encode(emb)
        recon = model.decode(mu, F.one_hot(torch.from_numpy(target[s:s + batch_size]), model.config.n_pitches).float())
        abs_sum += float((recon - emb).abs().double().sum())
        mus.append(mu.double().numpy())
        pred_gt.append(logits.argmax(1).numpy())
        pred_vae.append(model.encode(recon)[2].argmax(1).numpy())
    mu = np.concatenate(mus)
    mae = abs_sum / (len(lat) * np.prod(lat.emb.shape[1:]))
    metrics = {"n_notes": len(lat), "n_instruments": len(set(lat.instrument_str)), "mae": mae,
               "mae_normalised": mae / float(model.emb_std.item()),
               "pitch_acc_gt": pitch_accuracy(np.concatenate(pred_gt), target),
               "pitch_acc_vae": pitch_accuracy(np.concatenate(pred_vae), target),
               **variance_analysis(mu, np.array(lat.instrument_str), lat.pitch)}
    return {"mu": mu, "metrics": metrics}


def _g(x: float) -> str:
    return f"{x:.3g}"


def _pair(v: list[float]) -> str:
    return f"[{_g(v[0])}, {_g(v[1])}]"


def report_markdown(metrics: dict[str, dict]) -> str:
    """Tables 3-5 as Markdown, ours beside the paper's, from {split: evaluate_split(...)["metrics"]}."""
    splits = [s for s in ("train", "test") if s in metrics] + [s for s in metrics if s not in ("train", "test")]
    ref = lambda table, s: _g(PAPER[table][s]) if s in PAPER[table] else "-"  # noqa: E731
    lines = ["### Table 3: MAE of VAE reconstruction", "",
             "| split | ours | ours / embedding std | paper |", "|---|---|---|---|"]
    lines += [f"| {s} | {_g(metrics[s]['mae'])} | {_g(metrics[s]['mae_normalised'])} | {ref('mae', s)} |"
              for s in splits]
    lines += ["", "### Table 4: pitch classification 0/1 accuracy", "",
              "| split | GT ours | GT paper | VAE ours | VAE paper |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {_g(metrics[s]['pitch_acc_gt'])} | {ref('pitch_acc_gt', s)} | "
              f"{_g(metrics[s]['pitch_acc_vae'])} | {ref('pitch_acc_vae', s)} |" for s in splits]
    lines += ["", "### Table 5: variance of mu by instrument and by pitch", "",
              "| split | [V_inst,x, V_inst,y] ours | paper | [V_pitch,x, V_pitch,y] ours | paper | "
              "V_pitch / V_inst ours |", "|---|---|---|---|---|---|"]
    for s in splits:
        p = PAPER["variance"].get(s)
        m = metrics[s]
        lines.append(f"| {s} | {_pair(m['v_inst'])} | {_pair(p['v_inst']) if p else '-'} | {_pair(m['v_pitch'])} | "
                     f"{_pair(p['v_pitch']) if p else '-'} | {_pair(m['ratio'])} |")
    lines += ["", "MAE is in codec-embedding units (ours: our codec; the paper: EnCodec), so only the normalised "
              "column compares across codecs. The VAE column of Table 4 decodes z = mu with the ground-truth pitch "
              "and classifies the reconstruction with the same pitch head."]
    return "\n".join(lines) + "\n"


def ablation_markdown(rows: dict[str, dict]) -> str:
    """Table 6 as Markdown from {name: variance_analysis(...)} on the training split, beside the paper."""
    lines = ["### Table 6: ablations, variance of mu on the training split", "",
             "| model | [V_inst,x, V_inst,y] ours | paper | [V_pitch,x, V_pitch,y] ours | paper |",
             "|---|---|---|---|---|"]
    for name, m in rows.items():
        p = PAPER["ablation"].get(name)
        lines.append(f"| {ABLATION_TITLES.get(name, name)} | {_pair(m['v_inst'])} | "
                     f"{_pair(p['v_inst']) if p else '-'} | {_pair(m['v_pitch'])} | "
                     f"{_pair(p['v_pitch']) if p else '-'} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<name>.json` (ours and the paper's numbers) and `<name>.md` into out_dir."""
    return write_json_markdown(out_dir, name, {"ours": data, "paper": PAPER}, markdown)


def evaluate_checkpoint(checkpoint: Path, cache_dir: Path, out_dir: Path,
                        splits: tuple[str, ...] = ("train", "test")) -> dict[str, dict]:
    """`vae eval`: Tables 3-5 (vae_eval.json / .md) and a timbre map PNG per split, from one checkpoint."""
    model, _ = load_vae(checkpoint)
    metrics = {}
    for split in splits:
        lat = load_latents(cache_dir, split)
        result = evaluate_split(model, lat)
        metrics[split] = result["metrics"]
        save_timbre_map(Path(out_dir) / f"timbre_map_{split}.png", result["mu"], lat.family, lat.instrument,
                        f"timbre map, {split} ({len(lat)} notes)")
    write_report(out_dir, "vae_eval", {"checkpoint": str(checkpoint), "latents": str(cache_dir), **metrics},
                 report_markdown(metrics))
    return metrics


def write_maps(checkpoint: Path, cache_dir: Path, out_dir: Path,
               splits: tuple[str, ...] = ("train", "test")) -> list[Path]:
    """`vae map`: timbre_map_<split>.png per split and the training instruments' centroids as timbre_map.json."""
    model, extra = load_vae(checkpoint)
    out_dir, written = Path(out_dir), []
    for split in splits:
        lat = load_latents(cache_dir, split)
        mu = latent_means(model, lat.emb)
        written.append(save_timbre_map(out_dir / f"timbre_map_{split}.png", mu, lat.family, lat.instrument,
                                       f"timbre map, {split} ({len(lat)} notes)"))
        if split == "train":
            path = out_dir / "timbre_map.json"
            path.write_text(json.dumps(timbre_map(model, lat, extra["classes"], mu), indent=1))
            written.append(path)
    return written


def config_differences(checkpoint: Path, cfg: VAEConfig) -> list[str]:
    """Names of the VAEConfig fields (loss fields as loss.NAME) in which `checkpoint` was trained otherwise than
    `cfg`; n_instruments, set from the data, is not compared."""
    stored = from_dict(VAEConfig, load_checkpoint(checkpoint, KIND)["config"])  # the config alone: no model built
    differ = [f.name for f in dataclasses.fields(VAEConfig)
              if f.name not in ("n_instruments", "loss") and getattr(stored, f.name) != getattr(cfg, f.name)]
    return differ + [f"loss.{f.name}" for f in dataclasses.fields(stored.loss)
                     if getattr(stored.loss, f.name) != getattr(cfg.loss, f.name)]


def run_ablations(cfg: VAEConfig, cache_dir: Path, out_dir: Path, baseline: Path | None = None,
                  threads: int | None = None, progress: bool = True) -> dict[str, dict]:
    """`vae ablate`: train the four ablations of Table 6 (and the baseline when `baseline` is None or missing)
    into out_dir/<name>/, then write table6.json / .md and the Figure-4-style ablation.png.

    Runs already in out_dir are continued (a finished one is kept), so the command can be rerun after a stop.
    """
    out_dir = Path(out_dir)
    ckpts: dict[str, Path] = {}
    if baseline is not None and Path(baseline).is_file():
        differ = config_differences(baseline, cfg)
        if differ:
            raise ValueError(f"baseline {baseline} was trained with another config than these ablations "
                             f"({', '.join(differ)} differ): pass the checkpoint of a run with the same preset, "
                             f"--epochs and --batch-size, or leave --baseline out to train one in "
                             f"{out_dir / 'baseline'}")
        ckpts["baseline"] = Path(baseline)
    else:
        ckpts["baseline"] = train_vae(cfg, cache_dir, out_dir / "baseline", True, threads, progress)
    for name, switch in VAE_ABLATIONS.items():
        ablated = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **{switch: False}))
        ckpts[name] = train_vae(ablated, cache_dir, out_dir / name, True, threads, progress)
    train = load_latents(cache_dir, "train")
    rows, panels = {}, []
    for name, ckpt in ckpts.items():
        mu = latent_means(load_vae(ckpt)[0], train.emb)
        rows[name] = variance_analysis(mu, np.array(train.instrument_str), train.pitch)
        if name != "baseline":
            panels.append((ABLATION_TITLES[name], mu, train.family, train.instrument))
    write_report(out_dir, "table6", {"checkpoints": {k: str(v) for k, v in ckpts.items()}, "epochs": cfg.epochs,
                                     **rows},
                 ablation_markdown(rows))
    save_ablation_figure(out_dir / "ablation.png", panels)
    return rows
