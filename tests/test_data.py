"""The soundfont dataset builder, the NSynth reader/filter and the checker."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pgesam_train.config import DataConfig, data_preset
from pgesam_train.data import nsynth, soundfonts
from pgesam_train.data.build import build_dataset
from pgesam_train.data.splits import Candidate, assign_splits


def test_tiny_dataset_schema_and_audio(tiny_dataset: Path) -> None:
    counts, problems = nsynth.check_dataset(tiny_dataset)
    assert problems == []
    assert counts == {"train": 6, "valid": 6, "test": 6}  # 2 families x 1 instrument per split x 3 pitches
    ex = nsynth.read_examples(tiny_dataset, "train")
    for key, e in ex.items():
        assert set(nsynth.REQUIRED_KEYS) <= set(e)
        assert nsynth.NOTE_STR.match(key) and e["velocity"] == 100 and e["sample_rate"] == 16000
        assert e["instrument_family_str"] in ("keyboard", "string")
    note = nsynth.load_split(tiny_dataset, "train")[0]
    audio = nsynth.load_audio(note)
    assert audio.shape == (64000,) and audio.dtype == np.float32
    assert 0.85 < np.abs(audio).max() <= 0.9  # peak-normalised to -1 dBFS
    assert np.abs(audio[: 16000 * 3]).max() > 10 * np.abs(audio[-1600:]).max()  # released: the tail decays


def test_splits_are_instrument_disjoint_and_metadata_complete(tiny_dataset: Path) -> None:
    seen: dict[int, str] = {}
    for split in nsynth.SPLITS:
        for n in nsynth.load_split(tiny_dataset, split):
            assert seen.setdefault(n.instrument, split) == split
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["soundfonts"][0]["licence"] == "GPL-2" and meta["soundfonts"][0]["debian_package"]
    assert {i["split"] for i in meta["instruments"]} == set(nsynth.SPLITS)
    assert "| keyboard |" in meta["summary"]


def test_near_duplicate_instruments_share_a_split() -> None:
    cands = [Candidate(sf_, prog, "string", "acoustic", "fluidr3" if sf_ != "tim" else "tim", str(prog))
             for sf_ in ("fluidr3", "musescore", "tim") for prog in range(40, 46)]
    splits = assign_splits(cands, {"test": 2, "valid": 2, "train": 10}, seed=3)
    group_split = {}
    for split, chosen in splits.items():
        assert len(chosen) <= {"test": 2, "valid": 2, "train": 10}[split]
        for c in chosen:
            assert group_split.setdefault(c.group, split) == split
    assert len({c.group for c in splits["test"]}) == len(splits["test"])  # one per group in test
    assert splits == assign_splits(list(reversed(cands)), {"test": 2, "valid": 2, "train": 10}, seed=3)


def test_bad_inputs_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="outside the MIDI range"):
        DataConfig(pitch_max=130)
    with pytest.raises(ValueError, match="unknown instrument family"):
        soundfonts.programs_for(("kazoo",), None)
    with pytest.raises(ValueError, match="unknown soundfont"):
        soundfonts.soundfonts_for(("nope",))
    missing = dataclasses.replace(soundfonts.SOUNDFONTS["timgm6mb"], paths=(str(tmp_path / "gone.sf2"),))
    monkeypatch.setitem(soundfonts.SOUNDFONTS, "timgm6mb", missing)
    with pytest.raises(FileNotFoundError, match="apt-get install timgm6mb-soundfont"):
        build_dataset(data_preset("tiny"), tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tiny_dataset: Path) -> None:
    with pytest.raises(FileExistsError, match="--force"):
        build_dataset(data_preset("tiny"), tiny_dataset, log=lambda *_: None)


def _fake_nsynth(root: Path) -> None:
    """A small real-NSynth-like folder: 3 families x 12 instruments, pitches 40-80 step 8, two velocities."""
    rng = np.random.default_rng(0)
    for split in nsynth.SPLITS:
        audio_dir = nsynth.split_dir(root, split) / "audio"
        audio_dir.mkdir(parents=True)
        examples = {}
        for fam in (0, 3, 8):
            for k in range(12):
                inst = 1000 * nsynth.SPLITS.index(split) + 100 * fam + k
                for pitch in range(40, 81, 8):
                    for vel in (50, 100):
                        key = nsynth.note_str(nsynth.FAMILIES[fam], "acoustic", inst % 1000, pitch, vel)
                        examples[key] = {"note": len(examples), "note_str": key, "instrument": inst,
                                         "instrument_str": key.split("-")[0], "instrument_source": 0,
                                         "instrument_source_str": "acoustic", "instrument_family": fam,
                                         "instrument_family_str": nsynth.FAMILIES[fam], "pitch": pitch,
                                         "velocity": vel, "sample_rate": 16000, "qualities": [0] * 10,
                                         "qualities_str": []}
                        if split == "test" or (k == 0 and pitch == 48):
                            sf.write(audio_dir / f"{key}.wav", rng.normal(0, 0.1, 64000), 16000, subtype="PCM_16")
        (nsynth.split_dir(root, split) / "examples.json").write_text(json.dumps(examples))


def test_real_nsynth_reader_applies_the_paper_filter(tmp_path: Path) -> None:
    _fake_nsynth(tmp_path)
    notes = nsynth.load_split(tmp_path, "train", nsynth.NoteFilter())
    assert notes and all(48 <= n.pitch <= 72 and n.velocity == 100 for n in notes)
    per_family: dict[int, set[int]] = {}
    for n in notes:
        per_family.setdefault(n.family, set()).add(n.instrument)
    assert {f: len(s) for f, s in per_family.items()} == {0: 10, 3: 10, 8: 10}
    assert notes == nsynth.load_split(tmp_path, "train", nsynth.NoteFilter())  # seeded: reproducible
    assert sorted({n.pitch for n in notes}) == [48, 56, 64, 72]
    counts, problems = nsynth.check_dataset(tmp_path, splits=("test",))
    assert counts == {"test": 3 * 12 * 6 * 2} and problems == []


def test_checker_reports_broken_folders(tmp_path: Path, tiny_dataset: Path) -> None:
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    wavs = sorted((broken / "nsynth-train" / "audio").glob("*.wav"))
    wavs[0].unlink()
    sf.write(wavs[1], np.zeros(32000), 22050, subtype="PCM_16")
    ex = json.loads((broken / "nsynth-valid" / "examples.json").read_text())
    key = next(iter(ex))
    ex["bad-id"] = dict(ex[key], note_str="bad-id")
    (broken / "nsynth-valid" / "examples.json").write_text(json.dumps(ex))
    (broken / "nsynth-test" / "examples.json").unlink()
    _, problems = nsynth.check_dataset(broken)
    text = "\n".join(problems)
    assert "is missing" in text and "sample rate 22050" in text and "32000 samples" in text
    assert "note id does not match" in text and "nsynth-test/examples.json not found" in text
