"""`pgesam-train report`: every section present, missing inputs named with the command that makes them, evaluation
outputs carried into REPORT.md with their figures."""
from __future__ import annotations

import json

from pgesam_train.config import vae_preset
from pgesam_train.report import ReportInputs, pitch_by_pitch, write_report


def test_missing_inputs_say_which_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path / "home"))
    inp = ReportInputs(dataset=tmp_path / "no-dataset", runs=tmp_path / "runs")
    text = write_report(tmp_path / "REPORT.md", tmp_path / "docs", inp, examples=False).read_text()
    for heading in ("## Where each model was trained", "## Data", "## Codec", "## Stage 1", "## Ablations",
                    "## Stage 2", "## Generation speed in torch", "## The bundle's own notes", "## Engine speed"):
        assert heading in text
    assert "`pgesam-train vae eval --preset small`" in text
    assert "`pgesam-train codec eval --checkpoint" in text
    assert "`pgesam-train bench --preset small --threads 1 --repeats 9`" in text
    assert text.count("Not measured yet") == 8
    assert "`pgesam-train export --preset small --weights fp16 --no-static --variant int8 --out B" in text


def test_evaluation_outputs_and_figures_are_carried_in(tmp_path, monkeypatch):
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path / "home"))
    runs = tmp_path / "runs"
    (runs / "vae-eval-small").mkdir(parents=True)
    (runs / "vae-eval-small" / "vae_eval.md").write_text("| table 3 | 0.5 |\n")
    (runs / "vae-eval-small" / "timbre_map_train.png").write_bytes(b"\x89PNG fake")
    tf = runs / "transformer-eval-small"
    tf.mkdir()
    (tf / "transformer_eval.md").write_text("| table 4 | 0.9 |\n")
    audio = {"test_generated": {"n": 4, "within_50c": 0.5, "per_note": {"pitch": [48, 48, 60, 60],
                                                                        "cents": [3.0, None, 80.0, -10.0]}}}
    (tf / "transformer_eval.json").write_text(json.dumps({"audio": audio}))
    (runs / "bench-small").mkdir()
    (runs / "bench-small" / "bench.md").write_text("| torch-cached | 1 | 0.9 | 3.00 | 12.0x | |\n")
    inp = ReportInputs(dataset=tmp_path / "no-dataset", runs=runs)
    docs = tmp_path / "docs"
    text = write_report(tmp_path / "REPORT.md", docs, inp, examples=False, shortfalls="Fewer steps.").read_text()
    assert "| table 3 | 0.5 |" in text and "| table 4 | 0.9 |" in text and "| 12.0x |" in text
    assert "](docs/figures/timbre_map_train.png)" in text and (docs / "figures" / "timbre_map_train.png").is_file()
    assert (docs / "figures" / "pitch_by_pitch.png").stat().st_size > 1000
    assert text.rstrip().endswith("Fewer steps.")
    assert pitch_by_pitch({"audio": audio}) == {"test_generated": {48: 0.5, 60: 0.5}}


def test_ablations_at_other_epochs_say_so_in_their_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path / "home"))
    ab = tmp_path / "runs" / "vae-ablate-small"
    ab.mkdir(parents=True)
    (ab / "table6.md").write_text("| Baseline | [1, 2] |\n")
    (ab / "table6.json").write_text(json.dumps({"ours": {"epochs": 30, "checkpoints": {}}, "paper": {}}))
    inp = ReportInputs(dataset=tmp_path / "no-dataset", runs=tmp_path / "runs")
    text = write_report(tmp_path / "REPORT.md", tmp_path / "docs", inp, examples=False).read_text()
    assert "`pgesam-train vae ablate --preset small --epochs 30`" in text and "trained 30 epochs" in text
    own = vae_preset("small").epochs
    (ab / "table6.json").write_text(json.dumps({"ours": {"epochs": own}, "paper": {}}))  # the preset's own
    text = write_report(tmp_path / "REPORT.md", tmp_path / "docs", inp, examples=False).read_text()
    assert "`pgesam-train vae ablate --preset small`:" in text and "--epochs" not in text


def test_committed_snapshot_stands_in_for_a_missing_run(tmp_path, monkeypatch):
    """The report copies its inputs to docs/results; without the runs (a wiped cache) it reads those copies."""
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path / "home"))
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    ab = runs / "vae-ablate-small"
    ab.mkdir(parents=True)
    (ab / "table6.md").write_text("| Baseline | [1, 2] |\n")
    (ab / "table6.json").write_text(json.dumps({"ours": {"epochs": 30}, "paper": {}}))
    (ab / "ablation.png").write_bytes(b"\x89PNG fake")
    (runs / "bundle-pitch-small.json").write_text("not json")  # unreadable: reported as missing, not copied
    first = write_report(tmp_path / "REPORT.md", docs, ReportInputs(dataset=tmp_path / "none", runs=runs),
                         examples=False).read_text()
    assert (docs / "results" / "vae-ablate-small" / "table6.md").read_text() == "| Baseline | [1, 2] |\n"
    assert not list((docs / "results").rglob("*.partial")) and "committed copy" not in first
    assert not (docs / "results" / "bundle-pitch-small.json").exists()
    for f in ab.iterdir():
        f.unlink()
    ab.rmdir()
    second = write_report(tmp_path / "REPORT.md", docs, ReportInputs(dataset=tmp_path / "none", runs=runs),
                          examples=False).read_text()
    assert "| Baseline | [1, 2] |" in second and "--epochs 30" in second
    assert "*From the committed copy `docs/results/vae-ablate-small/table6.md`" in second
    assert "](docs/figures/ablation.png)" in second
    assert second.count("Not measured yet") == first.count("Not measured yet")
    # a live run wins over the copy, and refreshes it
    ab.mkdir()
    (ab / "table6.md").write_text("| Baseline | [3, 4] |\n")
    third = write_report(tmp_path / "REPORT.md", docs, ReportInputs(dataset=tmp_path / "none", runs=runs),
                         examples=False).read_text()
    assert "[3, 4]" in third and "committed copy `docs/results/vae-ablate-small/table6.md`" not in third
    assert "--epochs 30" not in third  # the live run has no table6.json: the old copy's is not mixed in
    assert (docs / "results" / "vae-ablate-small" / "table6.md").read_text() == "| Baseline | [3, 4] |\n"


def test_checkpoint_option_names_only_a_checkpoint_other_than_the_default(tmp_path):
    from pgesam_train.report import _checkpoint_option
    default = tmp_path / "vae.pt"
    assert _checkpoint_option(None, default) == ""
    assert _checkpoint_option(str(default), default) == ""
    assert _checkpoint_option("checkpoints/small/next/vae.pt", default) == " --checkpoint checkpoints/small/next/vae.pt"
