"""The torch reference render (tiny Transformer + tiny codec) and the `transformer`, `render`, `bench` commands."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from pgesam_train import paths
from pgesam_train.checkpoint import save_checkpoint
from pgesam_train.cli_transformer import bench_command, render_command, transformer
from pgesam_train.codec import build_codec, codec_id, codec_preset, save_codec
from pgesam_train.config import to_dict, transformer_preset
from pgesam_train.render import find_codec, render_notes, spectrogram_db, write_wav
from pgesam_train.transformer import TimbreTransformer
from test_transformer import write_cache, write_vae  # the synthetic latent cache and tiny VAE

SR, FRAMES, HOP = 24000, 300, 320


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec_path() -> Path:
    torch.manual_seed(0)
    codec = build_codec(codec_preset("tiny", backend="stft")).eval()
    return save_codec(paths.checkpoints_dir("codec", "tiny") / "stft.pt", codec)


@pytest.fixture(scope="module")
def transformer_path(codec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Transformer (random weights, outputs near the codec's frame scale) that names the tiny codec."""
    torch.manual_seed(0)
    cfg = transformer_preset("tiny")
    model = TimbreTransformer(cfg)
    model.set_normalization(torch.full((cfg.dim,), -4.0), 0.5)
    codec = find_codec(None, codec_path)
    return save_checkpoint(tmp_path_factory.mktemp("tr") / "transformer.pt", "transformer", to_dict(cfg), model,
                           extra={"codec": codec_id(codec)})


def test_render_writes_a_valid_24khz_wav(transformer_path: Path, codec_path: Path, tmp_path: Path) -> None:
    from pgesam_train.transformer import load_transformer
    model, extra = load_transformer(transformer_path)
    codec = find_codec(extra["codec"])  # found under $PGESAM_HOME/checkpoints/codec by its weights hash
    audio = render_notes(model, codec, 0.1, -0.2, [48, 60])
    assert audio.shape == (2, FRAMES * HOP) and np.isfinite(audio).all() and np.abs(audio).max() > 0
    path = write_wav(tmp_path / "note.wav", audio[1], codec.sample_rate)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, FRAMES * HOP, "PCM_16")
    back, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(back, np.clip(audio[1], -1, 1), atol=1 / 32767 + 1e-6)
    assert spectrogram_db(audio[0]).shape == (513, FRAMES * HOP // 256 + 1)


def test_find_codec_errors(codec_path: Path) -> None:
    cfg = to_dict(codec_preset("tiny", backend="stft"))
    with pytest.raises(ValueError, match="pass --codec"):
        find_codec(None)
    with pytest.raises(ValueError, match="no codec checkpoint matching other"):
        find_codec({"name": "other", "weights_sha256": "0" * 64, "config": cfg})


def test_render_command_note_and_grid(transformer_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--preset", "tiny", "--checkpoint", str(transformer_path), "--x", "0.3", "--y", "0.1"]
    res = runner.invoke(render_command, args + ["--pitch", "64", "-o", str(tmp_path / "n.wav")])
    assert res.exit_code == 0, res.output
    assert sf.info(tmp_path / "n.wav").samplerate == SR
    res = runner.invoke(render_command, args + ["--grid", "-o", str(tmp_path / "grid")])
    assert res.exit_code == 0, res.output
    wavs = sorted((tmp_path / "grid").glob("pitch_*.wav"))
    assert [w.name for w in wavs] == [f"pitch_{p:03d}.wav" for p in range(48, 73)]
    assert (tmp_path / "grid" / "grid.png").stat().st_size > 10_000
    res = runner.invoke(render_command, args + ["--pitch", "40", "-o", str(tmp_path / "low.wav")])
    assert res.exit_code != 0 and "outside the model's range" in str(res.exception)


def test_train_and_eval_commands(codec_path: Path, tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "latents")
    vae = write_vae(tmp_path / "vae.pt", cache)
    runner = CliRunner()
    common = ["--preset", "tiny", "--latents", str(cache), "--vae", str(vae), "--threads", "1"]
    res = runner.invoke(transformer, ["train", *common, "--steps", "6", "--out", str(tmp_path / "ckpt")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(transformer, ["eval", *common, "--checkpoint", str(tmp_path / "ckpt" / "transformer.pt"),
                                      "--codec", str(codec_path), "--max-notes", "4", "--audio-notes", "2",
                                      "--interp-notes", "2", "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "eval" / "transformer_eval.json").read_text())
    assert set(m["audio"]) == {"train_ground_truth", "train_generated", "test_ground_truth", "test_generated",
                               "interpolated_train", "interpolated_test"}
    assert all(r["n"] == 2 and 0 <= r["within_50c"] <= 1 for r in m["audio"].values())
    assert all(len(r["per_note"]["pitch"]) == len(r["per_note"]["cents"]) == 2 for r in m["audio"].values())
    assert "torchcrepe" in (tmp_path / "eval" / "transformer_eval.md").read_text()
    assert m["command"] == ("pgesam-train transformer eval --preset tiny --max-notes 4 --audio-notes 2 "
                            f"--interp-notes 2 --checkpoint {tmp_path / 'ckpt' / 'transformer.pt'} --vae {vae}")
    # what the report prints above the tables: the checkpoint and VAE evaluated, where they were not the defaults


def test_bench_command(tmp_path: Path) -> None:
    res = CliRunner().invoke(bench_command, ["--preset", "tiny", "--frames", "8", "--batch", "1", "--batch", "2",
                                             "--repeats", "1", "--uncached-stride", "3", "--threads", "1",
                                             "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["weights"] == "random (tiny preset)"
    assert set(report["speedup_vs_uncached"]) == {"torch-cached@1", "torch-cached@2", "torch-cached-dynamic@1",
                                                  "torch-cached-dynamic@2"}
    assert "| torch-uncached | 2 |" in res.output
