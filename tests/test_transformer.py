"""The Stage-2 modules on the tiny preset: shapes, causality, conditioning, cache layouts, config; training on a
synthetic latent cache (loss falls, checkpoint, exact resume) and the Table 3-4 evaluation."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgesam_train.checkpoint import load_checkpoint, save_checkpoint, without_optimizer
from pgesam_train.config import TransformerConfig, from_dict, to_dict, transformer_preset, vae_preset
from pgesam_train.data.latents import LatentWriter, load_latents
from pgesam_train.evaluate_transformer import evaluate_transformer, write_report
from pgesam_train.generate import cross_kv_shape, empty_cache
from pgesam_train.train_transformer import BEST_NAME, dim_weights, lr_at, teacher_forced_loss, train_transformer
from pgesam_train.train_vae import embedding_stats
from pgesam_train.transformer import TimbreTransformer, load_transformer
from pgesam_train.vae import VAE, load_vae

B, T = 3, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> TimbreTransformer:
    torch.manual_seed(0)
    m = TimbreTransformer(transformer_preset("tiny")).eval()
    m.set_normalization(torch.linspace(-1, 1, m.config.dim), 2.0)
    return m


def _inputs(cfg: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    z = torch.rand(B, 2, generator=g) - 0.5
    pitch = torch.tensor([cfg.pitch_min, cfg.pitch_min + 7, cfg.pitch_min + cfg.n_pitches - 1])
    frames = torch.randn(B, T, cfg.dim, generator=g)
    return z, pitch, frames


def test_shapes(model: TimbreTransformer) -> None:
    cfg = model.config
    z, pitch, frames = _inputs(cfg)
    memory = model.encode(z, pitch)
    assert memory.shape == (B, 3, cfg.d_model)
    cross = model.cross_kv(memory)
    assert len(cross) == cfg.n_decoder_layers
    assert all(t.shape == cross_kv_shape(cfg, B) == (B, cfg.n_heads, 3, cfg.head_dim) for kv in cross for t in kv)
    assert model(z, pitch, frames).shape == (B, T, cfg.dim)
    kv = empty_cache(cfg, B)
    assert len(kv) == cfg.n_decoder_layers and all(t.shape == (B, cfg.n_heads, 0, cfg.head_dim) for p in kv for t in p)
    nxt, kv = model.decode_step(frames[:, 0], torch.tensor(0), kv, cross)
    assert nxt.shape == (B, cfg.dim) and all(t.shape[2] == 1 for p in kv for t in p)
    static = empty_cache(cfg, B, static=True)
    nxt2, static2 = model.decode_step_static(frames[:, 0], torch.tensor(0), static, cross)
    assert all(t.shape == (B, cfg.n_heads, cfg.frames, cfg.head_dim) for p in static + static2 for t in p)
    torch.testing.assert_close(nxt2, nxt, atol=1e-6, rtol=0)


def test_checkpoint_names_are_unchanged(model: TimbreTransformer) -> None:
    """The per-layer cache layout is a change of the step code only: checkpoints saved before it still load."""
    names = set(model.state_dict())
    for i in range(model.config.n_decoder_layers):
        assert {f"decoder.{i}.attn.qkv.weight", f"decoder.{i}.attn.proj.bias", f"decoder.{i}.cross.q.weight",
                f"decoder.{i}.cross.kv.weight", f"decoder.{i}.ff.net.2.weight"} <= names
    assert not any("cache" in n for n in names)


def test_decoder_is_causal(model: TimbreTransformer) -> None:
    """Changing frames after position k changes no prediction at positions <= k."""
    z, pitch, frames = _inputs(model.config)
    k = 17
    later = frames.clone()
    later[:, k + 1:] += torch.randn_like(later[:, k + 1:])
    a, b = model(z, pitch, frames), model(z, pitch, later)
    torch.testing.assert_close(a[:, :k + 1], b[:, :k + 1], atol=1e-6, rtol=0)
    assert (a[:, k + 1:] - b[:, k + 1:]).abs().max() > 1e-3


def test_conditioning_matters(model: TimbreTransformer) -> None:
    """Pitch and timbre point both change the output (the encoder is wired in)."""
    z, pitch, frames = _inputs(model.config)
    base = model(z, pitch, frames)
    assert (model(z, pitch.roll(1), frames) - base).abs().max() > 1e-4
    assert (model(z + 0.3, pitch, frames) - base).abs().max() > 1e-4


def test_static_step_with_per_row_positions(model: TimbreTransformer) -> None:
    """Two notes in one static cache, the second started 4 steps later, each match their solo run."""
    cfg = model.config
    z, pitch, _ = _inputs(cfg)
    z, pitch = z[:2], pitch[:2]
    with torch.no_grad():
        cross = model.cross_kv(model.encode(z, pitch))
        solo = []
        for i in range(2):
            kv, f, out = empty_cache(cfg, 1), torch.zeros(1, cfg.dim), []
            for t in range(10):
                f, kv = model.decode_step(f, torch.tensor(t), kv, [(k[i:i + 1], v[i:i + 1]) for k, v in cross])
                out.append(f[0])
            solo.append(torch.stack(out))
        kv, f = empty_cache(cfg, 2, static=True), torch.zeros(2, cfg.dim)
        got: list[list[torch.Tensor]] = [[], []]
        for step in range(14):
            pos = torch.tensor([step, max(step - 4, 0)])
            f_new, kv = model.decode_step_static(f, pos, kv, cross)
            got[0].append(f_new[0])
            if step >= 4:
                got[1].append(f_new[1])
            f = torch.stack([f_new[0], f_new[1] if step >= 4 else torch.zeros(cfg.dim)])
    torch.testing.assert_close(torch.stack(got[0][:10]), solo[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(got[1]), solo[1], atol=1e-5, rtol=0)


def test_folded_cross_attention_equals_attention(model: TimbreTransformer) -> None:
    """`CrossAttention.fold` + `step_folded` (eager fast path) give `step`'s output for every note of a batch."""
    cfg = model.config
    z, pitch, _ = _inputs(cfg)
    layer = model.decoder[0].cross
    with torch.no_grad():
        kv = layer.memory_kv(model.encode(z, pitch))  # 3 different notes
        x = model.decoder[0].ln2(torch.randn(B, cfg.d_model, generator=torch.Generator().manual_seed(2)))
        ref = layer.step(x, kv)  # (B, d)
        got = layer.step_folded(x, layer.fold(kv))  # (B, d)
    assert got.shape == (B, cfg.d_model)
    assert ref.abs().max() > 1e-3  # a real signal, not two zeros
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_normalization_keeps_raw_units(model: TimbreTransformer) -> None:
    assert torch.allclose(model.emb_mean, torch.linspace(-1, 1, model.config.dim))
    with pytest.raises(ValueError, match="std must be positive"):
        model.set_normalization(torch.zeros(model.config.dim), 0.0)


def test_too_many_frames_is_an_error(model: TimbreTransformer) -> None:
    cfg = model.config
    z, pitch, _ = _inputs(cfg)
    with pytest.raises(ValueError, match="positions"):
        model(z, pitch, torch.zeros(B, cfg.frames + 1, cfg.dim))


def test_config_round_trip_and_presets() -> None:
    for name in ("tiny", "small", "paper"):
        cfg = transformer_preset(name)
        assert from_dict(TransformerConfig, to_dict(cfg)) == cfg
        assert cfg.frames == 300 and cfg.dim == 128 and cfg.n_pitches == 25 and cfg.pitch_min == 48
        assert cfg.z_noise == 0.01
    paper = transformer_preset("paper")
    assert (paper.d_model, paper.n_encoder_layers, paper.n_decoder_layers, paper.n_heads, paper.d_ff) == \
        (512, 8, 12, 8, 8192)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(paper, n_heads=7)
    with pytest.raises(ValueError, match="unknown transformer preset"):
        transformer_preset("huge")


# ------------------------------------------------------------------------------------- training on a synthetic cache
PITCHES = (48, 55, 60, 67, 72)


def write_cache(root: Path, n_inst: tuple[int, int, int] = (4, 2, 2), seed: int = 0) -> Path:
    """Instruments = a random spectral envelope with its own decay; pitch = a Gaussian bump at channel
    10 + 4 (p - 48) that pulses at a pitch-dependent rate, so the next frame depends on pitch and timbre."""
    rng = np.random.default_rng(seed)
    t, ch, num = np.arange(300), np.arange(128), 0
    for split, n in zip(("train", "valid", "test"), n_inst):
        w = LatentWriter(root, split, {"name": "synthetic"}, "synthetic", n * len(PITCHES), 128, 300)
        for k in range(n):
            env, decay = rng.normal(0, 1, 128).cumsum() / 8, np.exp(-t / rng.uniform(50, 300))
            name = f"keyboard_synthetic_{num:03d}"
            for j, p in enumerate(PITCHES):
                bump = 4 * np.exp(-0.5 * ((ch - (10 + 4 * (p - 48))) / 2.0) ** 2)
                pulse = 1 + 0.3 * np.sin(2 * np.pi * t * (p - 40) / 300)
                e = env[:, None] * decay[None] + bump[:, None] * pulse[None] + 0.02 * rng.normal(size=(128, 300))
                w.put(k * len(PITCHES) + j, e.astype(np.float16),
                      {"note_str": f"{name}-{p:03d}-100", "pitch": p, "instrument": num, "instrument_str": name,
                       "family": 4})
            num += 1
        w.close()
    return root


def write_vae(path: Path, cache: Path) -> Path:
    """An untrained tiny VAE, normalised on the cache: enough to condition the Transformer in tests."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(vae_preset("tiny"), n_instruments=4)
    vae = VAE(cfg)
    vae.set_normalization(*embedding_stats(load_latents(cache, "train").emb))
    return save_checkpoint(path, "vae", to_dict(cfg), vae)


@pytest.fixture(scope="module")
def cache_and_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tr")
    cache = write_cache(root / "latents")
    return cache, write_vae(root / "vae.pt", cache)


def tiny_train(steps: int, **kw: object) -> TransformerConfig:
    return dataclasses.replace(transformer_preset("tiny"), steps=steps, **kw)


def _losses(csv_path: Path) -> list[float]:
    with open(csv_path, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_loss_falls_and_checkpoints(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    cache, vae_path = cache_and_vae
    ckpt = train_transformer(tiny_train(80, log_every=10, val_every=40), cache, vae_path, tmp_path, threads=1)
    losses = _losses(tmp_path / "steps.csv")
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    model, extra = load_transformer(ckpt)
    assert model.config == tiny_train(80, log_every=10, val_every=40)
    assert extra["latents"] == str(cache) and extra["codec"] == {"name": "synthetic"}
    assert np.isfinite(extra["valid_loss"]) and (tmp_path / BEST_NAME).is_file()
    assert load_checkpoint(ckpt, "transformer")["step"] == 80
    assert model.emb_std.item() > 0 and model.emb_mean.abs().sum() > 0  # normalised on the training split


def test_resume_continues_exactly(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    cache, vae_path = cache_and_vae
    straight = load_transformer(train_transformer(tiny_train(24), cache, vae_path, tmp_path / "a", threads=1))[0]
    train_transformer(tiny_train(24), cache, vae_path, tmp_path / "b", threads=1, stop_after=12)
    assert load_checkpoint(tmp_path / "b" / "transformer.pt", "transformer")["step"] == 12
    resumed = load_transformer(train_transformer(tiny_train(24), cache, vae_path, tmp_path / "b", resume=True,
                                                 threads=1))[0]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert _losses(tmp_path / "b" / "steps.csv")[-1] == _losses(tmp_path / "a" / "steps.csv")[-1]


def test_input_noise_touches_inputs_only(model: TimbreTransformer) -> None:
    z, pitch, frames = _inputs(model.config)
    clean = teacher_forced_loss(model, z, pitch, frames)
    assert teacher_forced_loss(model, z, pitch, frames, 0.0, torch.Generator().manual_seed(5)) == clean
    noisy = [teacher_forced_loss(model, z, pitch, frames, 0.5, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert noisy[0] == noisy[1] != noisy[2] and noisy[0] != clean  # drawn from the generator, so resume is exact
    # causal decoder: noise on inputs 0..T-2 cannot reach the first prediction, which reads only <BOS>
    bos = torch.zeros_like(frames[:, :1])
    first = model(z, pitch, bos)[:, 0]
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    teacher_forced_loss(model, z, pitch, frames, 0.5, torch.Generator().manual_seed(5))
    hook.remove()
    torch.testing.assert_close(seen[0][:, 0] * model.emb_std + model.emb_mean, first)


def test_low_dims_weight_is_a_normalised_per_dim_weighting(model: TimbreTransformer) -> None:
    cfg = model.config
    assert dim_weights(cfg) is None and dim_weights(dataclasses.replace(cfg, low_dims=4)) is None  # off by default
    w = dim_weights(dataclasses.replace(cfg, low_dims=2, low_dims_weight=3.0))
    assert w is not None and w.tolist() == [3.0, 3.0] + [1.0] * (cfg.dim - 2)
    for bad in ({"low_dims": cfg.dim + 1, "low_dims_weight": 2.0}, {"low_dims": -1, "low_dims_weight": 2.0},
                {"low_dims": 2, "low_dims_weight": -1.0}):
        with pytest.raises(ValueError, match="low_dims"):
            dim_weights(dataclasses.replace(cfg, **bad))
    z, pitch, frames = _inputs(cfg)
    bos = torch.zeros_like(frames[:, :1])
    with torch.no_grad():
        err = ((model(z, pitch, torch.cat([bos, frames[:, :-1]], dim=1)) - frames) / model.emb_std) ** 2
        per_dim = err.mean(dim=(0, 1))  # (dim,)
        expected = (3.0 * per_dim[:2].sum() + per_dim[2:].sum()) / (2 * 3.0 + cfg.dim - 2)
        torch.testing.assert_close(teacher_forced_loss(model, z, pitch, frames, weights=w), expected)
        # equal weights give the plain MSE
        assert torch.isclose(teacher_forced_loss(model, z, pitch, frames, weights=torch.full((cfg.dim,), 2.0)),
                             teacher_forced_loss(model, z, pitch, frames))


def test_resume_takes_input_noise_from_the_command(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    cache, vae_path = cache_and_vae
    train_transformer(tiny_train(8), cache, vae_path, tmp_path, threads=1)
    resumed = load_transformer(train_transformer(tiny_train(12, input_noise=0.3, low_dims=8, low_dims_weight=2.0),
                                                 cache, vae_path, tmp_path, resume=True, threads=1))[0]
    assert resumed.config.input_noise == 0.3 and resumed.config.steps == 12
    assert (resumed.config.low_dims, resumed.config.low_dims_weight) == (8, 2.0)
    assert load_checkpoint(tmp_path / "transformer.pt", "transformer")["step"] == 12


def test_resume_on_another_vae_restarts_the_best_validation_loss(cache_and_vae: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """Continued on a new timbre map, the old map's best validation loss is not the one to beat."""
    cache, vae_path = cache_and_vae
    train_transformer(tiny_train(8, val_every=8), cache, vae_path, tmp_path, threads=1)
    state = torch.load(tmp_path / "transformer.pt", weights_only=False)
    state["extra"]["best_valid"] = 0.0  # unbeatable on the same map
    torch.save(state, tmp_path / "transformer.pt")
    other = tmp_path / "other-vae.pt"
    vae_state = torch.load(vae_path, weights_only=False)
    vae_state["extra"]["note"] = "another VAE file"  # other bytes: another sha256
    torch.save(vae_state, other)
    (tmp_path / BEST_NAME).unlink()
    extra = load_transformer(train_transformer(tiny_train(16, val_every=8), cache, other, tmp_path, resume=True,
                                               threads=1))[1]
    assert extra["vae"] == str(other) and 0.0 < extra["best_valid"] == extra["valid_loss"]
    assert (tmp_path / BEST_NAME).is_file()


def test_resume_without_optimizer_rewarms(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    """A shipped (weights-only) checkpoint resumes with fresh Adam moments under a short learning-rate ramp."""
    cache, vae_path = cache_and_vae
    cfg = tiny_train(40, warmup_steps=20, log_every=1)  # ramp: 20 // 4 = 5 steps
    train_transformer(dataclasses.replace(cfg, steps=30), cache, vae_path, tmp_path / "a", threads=1)
    without_optimizer(tmp_path / "a" / "transformer.pt", tmp_path / "b" / "transformer.pt")
    train_transformer(cfg, cache, vae_path, tmp_path / "b", resume=True, threads=1)
    with open(tmp_path / "b" / "steps.csv", newline="") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert [round(lrs[31 + i] / lr_at(cfg, 30 + i), 6) for i in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert load_checkpoint(tmp_path / "b" / "transformer.pt", "transformer")["extra"]["rewarm_from"] == 30


def test_resume_at_a_constant_learning_rate(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    """`--lr L --min-lr-ratio 1` on resume continues at L (after the re-warm ramp), not at the schedule's rate."""
    cache, vae_path = cache_and_vae
    cfg = tiny_train(30, warmup_steps=20, log_every=1)
    train_transformer(cfg, cache, vae_path, tmp_path / "a", threads=1)
    without_optimizer(tmp_path / "a" / "transformer.pt", tmp_path / "b" / "transformer.pt")
    resumed = load_transformer(train_transformer(dataclasses.replace(cfg, steps=40, lr=1e-4, min_lr_ratio=1.0),
                                                 cache, vae_path, tmp_path / "b", resume=True, threads=1))[0]
    assert (resumed.config.lr, resumed.config.min_lr_ratio) == (1e-4, 1.0)
    with open(tmp_path / "b" / "steps.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert [round(v / 1e-4, 6) for v in lrs] == [0.2, 0.4, 0.6, 0.8, 1.0] + [1.0] * 5


@pytest.mark.parametrize("args, message", [(["--lr", "0"], "learning rate must be > 0"),
                                           (["--min-lr-ratio", "1.5"], "min_lr_ratio must be in")])
def test_train_command_refuses_bad_learning_rates(tmp_path: Path, args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from pgesam_train.cli import main
    r = CliRunner().invoke(main, ["transformer", "train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "run").exists()


def test_wrong_pitch_range_is_refused(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    cache, vae_path = cache_and_vae
    with pytest.raises(ValueError, match="MIDI pitches 48-72"):
        train_transformer(tiny_train(1, pitch_min=50, n_pitches=12), cache, vae_path, tmp_path)


def test_evaluation_tables(cache_and_vae: tuple[Path, Path], tmp_path: Path) -> None:
    """Tables 3-4 on the synthetic cache, without audio (audio is covered in test_render)."""
    cache, vae_path = cache_and_vae
    model = load_transformer(train_transformer(tiny_train(20), cache, vae_path, tmp_path, threads=1))[0]
    vae = load_vae(vae_path)[0]
    m = evaluate_transformer(model, vae, cache, None, max_notes=6, echo=lambda _: None)
    for split in ("train", "test"):
        assert m[split]["n"] == 6 and m[split]["mae"] > 0 and 0 <= m[split]["pitch_acc"] <= 1
        assert m[split]["mae_teacher_forced"] < m[split]["mae"] * 10
    js, md = write_report(tmp_path / "eval", m)
    assert json.loads(js.read_text())["train"]["n"] == 6
    assert "| train | 6 |" in md.read_text() and "4.9e-05" in md.read_text()


def test_train_command_refuses_bad_low_dims_before_any_work(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pgesam_train.cli import main
    r = CliRunner().invoke(main, ["transformer", "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
                                 "--low-dims", "500", "--low-dims-weight", "2"])
    assert r.exit_code == 2 and "low_dims must be in 0..128" in r.output
    assert not (tmp_path / "run").exists()
