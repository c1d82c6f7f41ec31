"""`pgesam-train pipeline` at the tiny preset: every stage runs once, a second run skips them all, a longer
Transformer schedule resumes only the stages it invalidates."""
from __future__ import annotations

import json
import shutil

import pytest

from pgesam_train import paths
from pgesam_train.pipeline import STAGES, PipelinePlan, run_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.setenv("PGESAM_HOME", str(tmp_path / "home"))
    shutil.copytree(tiny_dataset, paths.dataset_dir("tiny"))  # the session's tiny dataset: no second render
    return tmp_path / "home"


def statuses(record: dict) -> dict[str, str]:
    return {name: entry["status"] for name, entry in record["stages"].items()}


def test_pipeline_runs_skips_and_resumes(fresh_home):
    plan = PipelinePlan("tiny", codec_steps=3, vae_epochs=2, transformer_steps=4, threads=1)
    lines: list[str] = []
    first = run_pipeline(plan, echo=lines.append)
    st = statuses(first)
    assert st["dataset"].startswith("skipped")  # copied in by the fixture
    assert all(st[s] == "done" for s in STAGES[1:]), st
    manifest = json.loads((plan.bundle / "manifest.json").read_text())
    assert manifest["weights"] == "fp16" and "decoder_step" in manifest["graphs"]  # the shipped form
    assert "decoder_step_static" not in manifest["graphs"]
    from pgesam_engine.bundle import Bundle
    assert Bundle(plan.bundle, providers="cpu", threads=1).has("codec_decoder_stream")  # the engine opens it
    assert any(line.startswith("[6/6] export: done") for line in lines)

    second = run_pipeline(plan, echo=lines.append)
    assert all(v.startswith("skipped") for v in statuses(second).values()), statuses(second)
    worked = json.loads(plan.record.read_text())["stages"]
    assert worked["transformer"]["seconds"] == first["stages"]["transformer"]["seconds"]  # skips cost nothing

    from pgesam_train.checkpoint import load_checkpoint, without_optimizer
    shipped = without_optimizer(plan.transformer_dir / "transformer.pt", plan.transformer_dir / "transformer.pt")
    assert load_checkpoint(shipped, "transformer")["optimizer"] is None  # the committed form resumes too
    longer = PipelinePlan("tiny", codec_steps=3, vae_epochs=2, transformer_steps=6, threads=1)
    third = statuses(run_pipeline(longer, echo=lines.append))
    assert third["transformer"] == "done" and third["export"] == "done"
    assert third["codec"].startswith("skipped") and third["vae"].startswith("skipped")
    assert load_checkpoint(longer.transformer_dir / "transformer.pt", "transformer")["step"] == 6


def test_pipeline_rejects_an_unknown_stage(fresh_home):
    with pytest.raises(ValueError, match="unknown pipeline stage"):
        run_pipeline(PipelinePlan("tiny"), stages=("dataset", "mastering"))
