"""Stage-1 VAE on the tiny preset: shapes, training on a synthetic latent cache, resume, the timbre map, the
evaluation metrics on constructed cases, and the `vae` CLI commands."""
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pgesam_train.checkpoint import load_checkpoint
from pgesam_train.cli_vae import find_latents, vae
from pgesam_train.config import VAEConfig, from_dict, to_dict, vae_preset
from pgesam_train.data.latents import LatentWriter, load_latents
from pgesam_train.data.nsynth import FAMILIES
from pgesam_train.evaluate_vae import (evaluate_split, group_variance, mean_abs_error, pitch_accuracy,
                                       variance_analysis)
from pgesam_train.plots import note_colors
from pgesam_train.train_vae import learning_rate, latent_means, map_json_path, pitch_classes, train_vae
from pgesam_train.vae import VAE, load_vae

PITCHES = (48, 52, 55, 60, 64, 67, 72)
FRAMES = 300


def tiny(**kw) -> VAEConfig:
    return dataclasses.replace(vae_preset("tiny"), **kw)


def write_cache(root: Path, n_inst=(8, 3, 3), seed: int = 0) -> Path:
    """Instruments = a random smooth spectral envelope; pitch = a Gaussian bump at channel 10 + 4 (p - 48),
    so pitch is recoverable from the embedding. Families alternate over 0, 2, 4, 6."""
    rng = np.random.default_rng(seed)
    t, ch, num = np.arange(FRAMES), np.arange(128), 0
    for split, n in zip(("train", "valid", "test"), n_inst):
        w = LatentWriter(root, split, {"name": "synthetic"}, "synthetic", n * len(PITCHES), 128, FRAMES)
        for k in range(n):
            fam, env = (num % 4) * 2, rng.normal(0, 1, 128).cumsum() / 8
            decay, name = np.exp(-t / rng.uniform(50, 300)), f"{FAMILIES[(num % 4) * 2]}_synthetic_{num:03d}"
            for j, p in enumerate(PITCHES):
                bump = 4 * np.exp(-0.5 * ((ch - (10 + 4 * (p - 48))) / 2.0) ** 2)
                e = (env + bump)[:, None] * decay[None] + 0.05 * rng.normal(size=(128, FRAMES))
                w.put(k * len(PITCHES) + j, e.astype(np.float16),
                      {"note_str": f"{name}-{p:03d}-100", "pitch": p, "instrument": num, "instrument_str": name,
                       "family": fam})
            num += 1
        w.close()
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    return train_vae(tiny(epochs=3), cache, tmp_path_factory.mktemp("vae"), threads=1, progress=False)


def test_config_roundtrip_keeps_the_nested_loss():
    cfg = dataclasses.replace(vae_preset("small"), n_instruments=7)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, use_kl=False))
    back = from_dict(VAEConfig, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg and back.loss.use_kl is False
    assert vae_preset("paper").conv_channels == (128, 256, 512, 1024, 2048)
    with pytest.raises(ValueError, match="dim=128"):
        VAEConfig(deconv_channels=(8, 8, 8, 8, 64))
    with pytest.raises(ValueError, match="unknown vae preset"):
        vae_preset("huge")


@pytest.mark.parametrize("frames", [300, 77])
def test_shapes_of_the_api(frames):
    torch.manual_seed(0)
    model = VAE(tiny(frames=frames, n_instruments=5)).eval()
    emb = torch.randn(3, 128, frames)
    mu, logvar, logits = model.encode(emb)
    assert mu.shape == (3, 2) and logvar.shape == (3, 2) and logits.shape == (3, 25)
    assert model.decode(mu, model.pitch_onehot(logits)).shape == (3, 128, frames)
    out = model(emb)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"mu": (3, 2), "logvar": (3, 2), "z": (3, 2), "pitch_logits": (3, 25),
                      "recon": (3, 128, frames), "inst_logits": (3, 5), "fam_logits": (3, 11)}
    assert torch.equal(out["z"], out["mu"])  # eval mode decodes the mean
    model.train()
    assert not torch.equal(model(emb)["z"], model(emb)["mu"])
    with pytest.raises(ValueError, match="n_instruments"):
        VAE(tiny())


def test_training_writes_checkpoint_logs_and_map(trained, cache):
    model, extra = load_vae(trained)
    assert not model.training and model.config.n_instruments == 8
    classes = extra["classes"]
    assert [c["class"] for c in classes] == list(range(8))
    assert [c["instrument_str"] for c in classes] == sorted(c["instrument_str"] for c in classes)
    train = load_latents(cache, "train")
    mu = latent_means(model, train.emb)
    names = np.array(train.instrument_str)
    for row in extra["map"]["instruments"]:
        centroid = mu[names == row["instrument_str"]].mean(axis=0)
        assert (row["x"], row["y"]) == pytest.approx(tuple(centroid), abs=1e-5)
        assert row["n_notes"] == len(PITCHES) and row["family_str"] == FAMILIES[row["family"]]
    bounds = extra["map"]["bounds"]
    assert bounds["x"] == pytest.approx([mu[:, 0].min(), mu[:, 0].max()], abs=1e-5)
    assert json.loads(map_json_path(trained).read_text()) == extra["map"]
    with open(trained.parent / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(rows[-1][k])) for k in ("train_rec", "train_nei", "train_inst", "valid_pitch_acc"))
    with open(trained.parent / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == 3 * 2 and {"rec", "kl", "reg", "nei", "pitch", "inst", "fam"} <= set(steps[0])


def test_resume_continues_exactly(cache, tmp_path):
    cfg = tiny(epochs=2)
    straight = train_vae(cfg, cache, tmp_path / "a", threads=1, progress=False)
    # one epoch with N = 1 has gamma = 0, like the first epoch of N = 2; then resume with N = 2
    train_vae(dataclasses.replace(cfg, epochs=1), cache, tmp_path / "b", threads=1, progress=False)
    resumed = train_vae(cfg, cache, tmp_path / "b", resume=True, threads=1, progress=False)
    a, b = load_checkpoint(straight, "vae"), load_checkpoint(resumed, "vae")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k
    with pytest.raises(FileExistsError, match="--resume"):
        train_vae(cfg, cache, tmp_path / "b", threads=1, progress=False)
    with pytest.raises(ValueError, match="another VAE config"):
        train_vae(tiny(epochs=2, lr=1e-4), cache, tmp_path / "b", resume=True, threads=1, progress=False)


def test_learning_rate_schedule(cache, tmp_path):
    cfg = tiny(epochs=2, lr=2e-3, lr_final=0.1)
    assert learning_rate(cfg, 0.0) == pytest.approx(2e-3)
    assert learning_rate(cfg, 0.5) == pytest.approx(2e-3 * 0.55)
    assert learning_rate(cfg, 1.0) == pytest.approx(2e-4)
    assert learning_rate(tiny(lr=2e-3), 0.7) == 2e-3  # lr_final 1 (the default): constant
    with pytest.raises(ValueError, match="lr_final"):
        tiny(lr_final=0.0)
    ckpt = train_vae(cfg, cache, tmp_path / "cos", threads=1, progress=False)
    last_lr = load_checkpoint(ckpt, "vae")["optimizer"]["param_groups"][0]["lr"]
    assert learning_rate(cfg, 1.0) < last_lr <= learning_rate(cfg, 0.5)  # the last step: in epoch 2's half


def test_pitch_head_learns_recoverable_pitch(cache, tmp_path):
    cfg = tiny(epochs=25, batch_size=16)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, beta_pitch=2.0))  # few steps: weight it up
    model, _ = load_vae(train_vae(cfg, cache, tmp_path, threads=1, progress=False))
    metrics = evaluate_split(model, load_latents(cache, "train"))["metrics"]
    assert metrics["pitch_acc_gt"] > 0.6  # chance: 1/7
    assert 0 <= metrics["pitch_acc_vae"] <= 1 and metrics["mae"] > 0
    assert len(metrics["v_inst"]) == len(metrics["v_pitch"]) == 2


def test_group_variance_on_points_placed_by_hand():
    # instrument a at (0, 0) and (2, 0): var (1, 0); instrument b at (1, 1) and (1, 3): var (0, 1)
    mu = np.array([[0, 0], [2, 0], [1, 1], [1, 3]], dtype=float)
    inst, pitch = np.array(["a", "a", "b", "b"]), np.array([60, 62, 60, 62])
    assert group_variance(mu, inst) == pytest.approx([0.5, 0.5])
    # pitch 60: (0, 0), (1, 1) -> var (0.25, 0.25); pitch 62: (2, 0), (1, 3) -> var (0.25, 2.25)
    result = variance_analysis(mu, inst, pitch)
    assert result["v_pitch"] == pytest.approx([0.25, 1.25])
    assert result["ratio"] == pytest.approx([0.5, 2.5])
    # perfectly disentangled: every note of an instrument on one point
    tight = np.repeat(np.array([[0.5, 0.0], [-0.5, 0.2]]), 3, axis=0)
    v = variance_analysis(tight, np.repeat([0, 1], 3), np.tile([48, 50, 52], 2))
    assert v["v_inst"] == pytest.approx([0.0, 0.0], abs=1e-30) and v["v_pitch"] == pytest.approx([0.25, 0.01])


def test_simple_metrics():
    assert mean_abs_error(np.zeros((2, 2)), np.array([[1, -1], [2, 0]])) == pytest.approx(1.0)
    assert pitch_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="covers 48-72"):
        pitch_classes(np.array([47, 60]), vae_preset("tiny"))


def test_family_shades():
    colors = note_colors(np.array([0, 0, 0, 5]), np.array([1, 1, 2, 9]))
    assert np.allclose(colors[0], colors[1]) and not np.allclose(colors[0], colors[2])
    assert np.abs(colors[0] - colors[3]).max() > np.abs(colors[0] - colors[2]).max()


def test_find_latents(tmp_path, monkeypatch):
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path))
    from click import ClickException
    with pytest.raises(ClickException, match="dataset encode"):
        find_latents(None)
    for name in ("soundfonts-tiny--x", "soundfonts-default--y"):
        (tmp_path / "latents" / name).mkdir(parents=True)
        (tmp_path / "latents" / name / "meta.json").write_text("{}")
    assert find_latents(None).name == "soundfonts-default--y"
    assert find_latents(tmp_path / "z") == tmp_path / "z"


def test_cli_train_eval_map_ablate(cache, tmp_path):
    runner = CliRunner()
    ck = tmp_path / "ck"
    common = ["--preset", "tiny", "--latents", str(cache)]
    res = runner.invoke(vae, ["train", *common, "--out", str(ck), "--epochs", "1", "--batch-size", "16",
                              "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (ck / "vae.pt").is_file() and (ck / "vae_map.json").is_file()
    assert load_vae(ck / "vae.pt")[0].config.batch_size == 16  # the override is what the checkpoint stores
    res = runner.invoke(vae, ["eval", *common, "--checkpoint", str(ck / "vae.pt"), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "Table 5" in res.output and (tmp_path / "ev" / "timbre_map_test.png").stat().st_size > 1000
    report = json.loads((tmp_path / "ev" / "vae_eval.json").read_text())
    assert set(report["ours"]) >= {"train", "test"} and report["paper"]["mae"]["train"] == 1.14e-3
    res = runner.invoke(vae, ["map", *common, "--checkpoint", str(ck / "vae.pt"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "timbre_map_train.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "m" / "timbre_map.json").read_text())["instruments"]) == 8
    res = runner.invoke(vae, ["ablate", *common, "--out", str(tmp_path / "ab"), "--baseline", str(ck / "vae.pt"),
                              "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "No family classifier" in res.output and (tmp_path / "ab" / "ablation.png").is_file()
    table = json.loads((tmp_path / "ab" / "table6.json").read_text())["ours"]
    assert set(table) >= {"baseline", "no_kl", "no_reg", "no_nei", "no_fam"}
    no_kl = load_vae(tmp_path / "ab" / "no_kl" / "vae.pt")[0].config
    assert no_kl.loss.use_kl is False and no_kl.batch_size == 16
    res = runner.invoke(vae, ["ablate", *common, "--out", str(tmp_path / "ab2"), "--baseline", str(ck / "vae.pt"),
                              "--epochs", "2", "--batch-size", "16", "--threads", "1", "--no-progress"])
    assert res.exit_code == 2 and "epochs differ" in res.output  # a baseline trained otherwise is refused
    assert not (tmp_path / "ab2").exists()
