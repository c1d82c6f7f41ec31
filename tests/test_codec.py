"""The codec interface, registry, checkpoints, training loop, Griffin-Lim floor and `dataset encode` on tiny configs."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from pgesam_train.checkpoint import CheckpointError, load_checkpoint, without_optimizer
from pgesam_train.codec import (Codec, CodecError, build_codec, codec_id, codec_preset, frames_for, load_codec,
                                resample, save_codec)
from pgesam_train.codecs import BACKENDS
from pgesam_train.data.latents import LatentCacheError, load_latents
from pgesam_train.data.nsynth import note_str
from pgesam_train.train_codec import (MagnitudeLoss, SpectralLoss, learning_rate, magnitude_loss, reconstruction_loss,
                                      train_codec)

SR = 24000


def harmonic(f0: float, seconds: float, sr: int = SR, decay: float = 0.5) -> np.ndarray:
    """A decaying 5-harmonic tone, (samples,) float32 with peak below 1."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * np.exp(-decay * t)
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def write_nsynth(root, notes_per_split: dict[str, list[tuple[int, int]]]) -> None:
    """A small NSynth-format folder: {split: [(instrument, midi pitch), ...]}, 4 s at 16 kHz."""
    for split, notes in notes_per_split.items():
        audio_dir = root / f"nsynth-{split}" / "audio"
        audio_dir.mkdir(parents=True)
        examples = {}
        for inst, pitch in notes:
            key = note_str("keyboard", "synthetic", inst, pitch, 100)
            sf.write(audio_dir / f"{key}.wav", harmonic(440 * 2 ** ((pitch - 69) / 12), 4.0, 16000),
                     16000, subtype="PCM_16")
            examples[key] = {"note": len(examples), "note_str": key, "instrument": inst,
                             "instrument_str": f"keyboard_synthetic_{inst:03d}", "instrument_source": 2,
                             "instrument_source_str": "synthetic", "instrument_family": 4,
                             "instrument_family_str": "keyboard", "pitch": pitch, "velocity": 100,
                             "sample_rate": 16000, "qualities": [0] * 10, "qualities_str": []}
        (root / f"nsynth-{split}" / "examples.json").write_text(json.dumps(examples))


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "nsynth"
    write_nsynth(root, {"train": [(0, 60), (0, 64), (1, 57)], "valid": [(2, 62)], "test": [(3, 59), (3, 67)]})
    return root


@pytest.mark.parametrize("backend", ["stft", "griffinlim"])
@pytest.mark.parametrize("samples", [1, 319, 320, 321, 24000, 96000])
def test_interface_shapes(backend, samples):
    codec = build_codec(codec_preset("tiny", backend)).eval()
    assert isinstance(codec, Codec) and BACKENDS[backend] is type(codec)
    assert (codec.sample_rate, codec.hop, codec.frame_rate, codec.dim) == (24000, 320, 75.0, 128)
    with torch.no_grad():
        emb = codec.encode(torch.randn(2, samples) * 0.1)
        assert emb.shape == (2, 128, math.ceil(samples / 320)) == (2, 128, frames_for(samples))
        assert codec.decode(emb).shape == (2, emb.shape[2] * 320)


def test_registry_and_presets():
    assert set(BACKENDS) == {"stft", "encodec", "griffinlim"}
    assert codec_preset("small").backend == "stft" and codec_preset("tiny", "griffinlim").backend == "griffinlim"
    with pytest.raises(ValueError, match="unknown codec preset"):
        codec_preset("huge")
    with pytest.raises(CodecError, match="unknown codec backend"):
        build_codec(dataclasses.replace(codec_preset("tiny"), backend="wavenet"))
    with pytest.raises(ValueError, match="n_mels"):
        dataclasses.replace(codec_preset("tiny"), n_mels=80)


def test_bad_input_errors():
    codec = build_codec(codec_preset("tiny")).eval()
    with pytest.raises(CodecError, match="16000 Hz"):
        codec.encode(torch.zeros(1, 16000), sample_rate=16000)
    with pytest.raises(CodecError, match=r"\(batch, samples\)"):
        codec.encode(torch.zeros(16000))
    with pytest.raises(CodecError, match=r"\(batch, samples\)"):
        codec.encode(np.zeros((1, 16000), dtype=np.float32))
    with pytest.raises(CodecError, match="0 samples"):
        codec.encode(torch.zeros(1, 0))
    with pytest.raises(CodecError, match=r"\(batch, 128, frames\)"):
        codec.decode(torch.zeros(1, 64, 10))
    with pytest.raises(CodecError, match="no ONNX"):
        build_codec(codec_preset("tiny", "griffinlim")).export_modules()


def test_resample_exact_length():
    y = resample(np.zeros(64000, dtype=np.float32), 16000, 24000)
    assert y.shape == (96000,) and y.dtype == np.float32


def test_checkpoint_round_trip_and_identity(tmp_path):
    codec = build_codec(codec_preset("tiny"))
    with torch.no_grad():
        codec.decoder.head.proj.bias.add_(0.5)  # differs from a fresh init
    path = save_codec(tmp_path / "c.pt", codec, step=7)
    loaded = load_codec(path)
    assert loaded.config == codec.config and not loaded.training
    emb = torch.randn(1, 128, 9)
    with torch.no_grad():
        assert torch.equal(loaded.decode(emb), codec.eval().decode(emb))
    ident = codec_id(loaded)
    assert ident == codec_id(codec) and json.loads(json.dumps(ident)) == ident
    assert ident != codec_id(build_codec(codec_preset("tiny")))
    with pytest.raises(CheckpointError, match="no codec checkpoint"):
        load_codec(tmp_path / "missing.pt")


def test_griffinlim_floor_keeps_pitch():
    codec = build_codec(codec_preset("small", "griffinlim"))
    x = torch.from_numpy(harmonic(261.63, 1.0))[None]
    y = codec.decode(codec.encode(x))
    spectrum = np.abs(np.fft.rfft(y[0, 2400:19200].numpy()))
    assert abs(np.argmax(spectrum) * SR / 16800 - 261.63) < 5  # strongest partial at the fundamental
    assert (codec.encode(y) - codec.encode(x)).abs().mean() < 0.5  # its mel matches the original's


@pytest.mark.parametrize("refine_iters,lr", [(0, 3e-3), (2, 1e-3)])  # refinement: gradients through 2 GL steps
def test_training_steps_lower_the_loss(refine_iters, lr):
    torch.manual_seed(0)
    codec = build_codec(dataclasses.replace(codec_preset("tiny"), refine_iters=refine_iters))
    x = torch.from_numpy(np.stack([harmonic(220, 0.3), harmonic(330, 0.3)]))
    loss_fn = SpectralLoss(SR)
    opt = torch.optim.AdamW(codec.parameters(), lr=lr)
    losses = []
    for _ in range(25):
        loss = reconstruction_loss(codec, loss_fn, x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_train_checkpoint_and_resume(dataset, tmp_path):
    config = dataclasses.replace(codec_preset("tiny"), steps=4)
    out = tmp_path / "codec.pt"
    first = train_codec(config, dataset, out, save_every=2, log_every=1, progress=False)
    assert first["step"] == 4 and load_codec(out).config == config
    second = train_codec(dataclasses.replace(config, steps=6), dataset, out, save_every=2, log_every=1,
                         progress=False)
    assert second["step"] == 6
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(r["loss"])) for r in rows) and rows[1]["valid_loss"] != ""
    with pytest.raises(CodecError, match="another config"):
        train_codec(dataclasses.replace(config, width=48), dataset, out, progress=False)
    with pytest.raises(CodecError, match="nothing to train"):
        train_codec(codec_preset("tiny", "griffinlim"), dataset, tmp_path / "gl.pt", progress=False)


def test_the_magnitude_loss_is_zero_on_the_original_and_trains_the_head():
    torch.manual_seed(0)
    config = dataclasses.replace(codec_preset("tiny"), loss_mag=1.0, loss_mel=0.0, loss_stft=0.0)
    codec = build_codec(config)
    x = torch.from_numpy(np.stack([harmonic(220, 0.3), harmonic(330, 0.3)]))
    mag_fn = magnitude_loss(config)
    assert isinstance(mag_fn, MagnitudeLoss) and magnitude_loss(codec_preset("tiny")) is None
    assert float(mag_fn(*mag_fn.stft(x), x)) == 0.0
    opt = torch.optim.AdamW(codec.parameters(), lr=3e-3)
    mags = []
    for _ in range(20):
        terms = reconstruction_loss(codec, SpectralLoss(SR), x, mag_fn)
        assert torch.equal(terms["loss"], terms["mag"])  # the only weighted term here
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        mags.append(terms["mag"].item())
    assert mags[-1] < 0.9 * mags[0], mags
    with pytest.raises(ValueError, match="loss_mag"):
        dataclasses.replace(codec_preset("tiny", "griffinlim"), loss_mag=1.0)


def test_a_fine_tune_resumes_a_shipped_checkpoint_with_another_loss(dataset, tmp_path):
    config = dataclasses.replace(codec_preset("tiny"), steps=4)
    first = tmp_path / "first.pt"
    train_codec(config, dataset, first, save_every=2, log_every=1, progress=False)
    out = without_optimizer(first, tmp_path / "fine.pt")  # what checkpoints/small/ holds
    tuned = dataclasses.replace(config, steps=8, loss_mag=0.5, lr=1e-4)
    assert train_codec(tuned, dataset, out, save_every=2, log_every=1, progress=False)["step"] == 8
    state = load_checkpoint(out, "codec")
    assert state["extra"]["rewarm_from"] == 4 and load_codec(out).config == tuned
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["step"]) for r in rows] == [5, 6, 7, 8] and all(float(r["mag"]) > 0 for r in rows)
    small = dataclasses.replace(codec_preset("small"), steps=16000)  # warm-up 500 steps: the ramp takes 125
    ramped = [learning_rate(small, s, rewarm_from=10000) / learning_rate(small, s) for s in (10000, 10062, 10124)]
    assert np.allclose(ramped, [1 / 125, 63 / 125, 1.0])
    with pytest.raises(CodecError, match="another config"):
        train_codec(dataclasses.replace(tuned, n_blocks=2), dataset, out, progress=False)


def test_a_resumed_log_with_a_new_column_keeps_its_rows(tmp_path):
    from pgesam_train.training import CSVLog
    path = tmp_path / "steps.csv"
    CSVLog(path).write(step=1, loss=0.5)
    log = CSVLog(path)  # as after a resume
    log.write(step=2, loss=0.4, mag=1.5)
    log.write(step=3, loss=0.3, mag=1.4)
    assert list(csv.DictReader(open(path))) == [{"step": "1", "loss": "0.5", "mag": ""},
                                                {"step": "2", "loss": "0.4", "mag": "1.5"},
                                                {"step": "3", "loss": "0.3", "mag": "1.4"}]


def test_a_narrower_decoder_over_the_same_log_mel_reads_the_same_latents():
    from pgesam_train.codec import codec_id
    base = codec_preset("tiny")
    same = [codec_id(build_codec(dataclasses.replace(base, **kw)))["encoder_sha256"]
            for kw in ({}, {"width": 16, "n_blocks": 2, "kernel": 3}, {"refine_iters": 2})]
    assert len(set(same)) == 1  # the log-mel does not depend on the decoder's sizes
    other = codec_id(build_codec(dataclasses.replace(base, n_mels=64, dim=64)))["encoder_sha256"]
    learned = [codec_id(build_codec(dataclasses.replace(base, encoder="learned", width=w)))["encoder_sha256"]
               for w in (16, 24)]
    assert other != same[0] and learned[0] != learned[1]  # a learned encoder's width does shape it


def test_train_cli_overrides_the_preset(dataset, tmp_path):
    from click.testing import CliRunner

    from pgesam_train.cli_codec import codec_group
    out = tmp_path / "refined.pt"
    args = ["train", "--preset", "tiny", "--dataset", str(dataset), "--out", str(out), "--steps", "2", "--width",
            "16", "--blocks", "2", "--refine-iters", "1", "--threads", "1"]
    result = CliRunner().invoke(codec_group, args)
    assert result.exit_code == 0, result.output
    config = load_codec(out).config
    assert (config.width, config.n_blocks, config.refine_iters, config.steps) == (16, 2, 1, 2)
    result = CliRunner().invoke(codec_group, args[:-4] + ["--refine-iters", "-1"])
    assert result.exit_code != 0 and "--refine-iters" in result.output
    result = CliRunner().invoke(codec_group, args + ["--from-scratch"])
    assert result.exit_code != 0 and "--backend encodec" in result.output
    result = CliRunner().invoke(codec_group, ["train", "--backend", "encodec", "--loss-mag", "1", "--out",
                                              str(tmp_path / "e.pt"), "--dataset", str(dataset)])
    assert result.exit_code != 0 and "--backend stft" in result.output
    tuned = tmp_path / "tuned.pt"
    result = CliRunner().invoke(codec_group, args[:-4] + ["--out", str(tuned), "--loss-mag", "0.5", "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert (load_codec(tuned).config.loss_mag, load_codec(tuned).config.lr) == (0.5, 1e-4)


def test_train_cli_trains_the_encodec_architecture_from_scratch(dataset, tmp_path):
    from click.testing import CliRunner

    from pgesam_train.cli_codec import codec_group
    out = tmp_path / "seanet.pt"
    args = ["train", "--backend", "encodec", "--dataset", str(dataset), "--steps", "1", "--threads", "1",
            "--n-filters", "2"]
    result = CliRunner().invoke(codec_group, args + ["--preset", "small", "--from-scratch", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = load_codec(out).config
    assert (config.backend, config.encodec_pretrained, config.encodec_n_filters) == ("encodec", False, 2)
    result = CliRunner().invoke(codec_group, args + ["--preset", "small", "--out", str(tmp_path / "meta.pt")])
    assert isinstance(result.exception, CodecError) and "Meta's EnCodec" in str(result.exception)
    assert not (tmp_path / "meta.pt").exists()


def test_encode_dataset_writes_a_readable_cache(dataset, tmp_path):
    from pgesam_train.encode_dataset import encode_dataset
    codec = build_codec(codec_preset("tiny"))
    cache = tmp_path / "latents"
    summary = encode_dataset(dataset, cache, codec, batch_size=2, progress=False)
    assert summary["notes"] == {"train": 3, "valid": 1, "test": 2}
    train = load_latents(cache, "train")
    assert train.emb.shape == (3, 128, 300) and list(train.pitch) == [60, 64, 57]
    assert train.meta["codec"] == codec_id(codec) and list(train.family) == [4, 4, 4]
    audio, _ = sf.read(dataset / "nsynth-train" / "audio" / f"{train.note_str[0]}.wav", dtype="float32")
    with torch.no_grad():
        expected = codec.encode(torch.from_numpy(resample(audio, 16000, 24000))[None])[0].numpy()
    np.testing.assert_allclose(train.emb[0].astype(np.float32), expected, atol=0.02)
    other = build_codec(dataclasses.replace(codec_preset("tiny"), encoder="learned"))  # another encoder
    with pytest.raises(LatentCacheError, match="refusing to mix"):
        encode_dataset(dataset, cache, other, splits=("test",), progress=False)


def test_eval_reports_every_codec_and_the_floor(dataset, tmp_path):
    from pgesam_train.eval_codec import bench_decode, evaluate_codecs, markdown_table
    out = tmp_path / "eval"
    results = evaluate_codecs({"tiny": build_codec(codec_preset("tiny")).eval()}, dataset, out, limit=2,
                              n_examples=1, progress=False)
    rows = results["rows"]
    assert list(rows) == ["ground_truth", "tiny", "griffinlim_floor"] and results["notes"] == 2
    assert rows["ground_truth"]["mel_l1"] == 0 and rows["ground_truth"]["pitch_ok"] == 1.0
    assert rows["griffinlim_floor"]["pitch_ok"] == 1.0 and rows["griffinlim_floor"]["mel_l1"] < rows["tiny"]["mel_l1"]
    assert "| griffinlim_floor |" in markdown_table(results)
    assert json.loads((out / "results.json").read_text())["rows"].keys() == rows.keys()
    assert len(list(out.glob("*.png"))) == 1 and len(list(out.glob("*.wav"))) == 3
    speed = bench_decode(build_codec(codec_preset("tiny")).eval(), frames=20, repeats=2, threads=1)
    assert speed["full_decode_s"] > 0 and speed["realtime_factor"] > 1
