"""``raypipe evaluate run`` with the eval-tiny preset: training data, a tuned export, a
synthetic benchmark of all 13 abilities, two models, scores, report and chart, on CPU."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.abilities import load_catalog
from raypipe.errors import ConfigError
from raypipe.evaluate.run import Plan, load_evaluate_config
from raypipe.jobs import evaluate as evaluate_job

PRESET = "raypipe/configs/evaluate/eval-tiny.yaml"
#: Smaller than the preset's own run, for the test's time: one training row per ability,
#: one epoch, one benchmark item per ability.
FAST = [
    "per_ability=1",
    "training.generate_overrides=[num_samples=13, render.width=32, render.height=32]",
    "training.train_overrides=[epochs=1]",
]


@pytest.mark.slow
def test_eval_tiny_runs_end_to_end_and_resumes(ray_local, tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_job.main(["run", "--config", PRESET, "--out", str(out), *FAST]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    abilities = set(load_catalog())
    assert len(abilities) == 13
    scores = json.loads((out / "report" / "scores.json").read_text())
    assert set(scores["models"]) == {"baseline", "tuned"}
    for name, entry in scores["models"].items():
        table = entry["benchmarks"]["synthetic"]
        assert set(table["abilities"]) == abilities, name
        assert table["overall"]["n"] == 13
        for s in table["abilities"].values():
            assert s["n"] == 1 and 0.0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1.0
    # The tuned model is the training recipe's export, with its lineage.
    tuned = scores["models"]["tuned"]
    assert Path(tuned["path"]) == out / "train" / "export"
    (source,) = tuned["lineage"]["datasets"]
    assert source["path"] == str(out / "train-data" / "data") and source["manifest"]
    assert summary["trained_model"] == str(out / "train" / "export")

    preds = pq.read_table(out / "report" / "predictions.parquet").to_pylist()
    assert len(preds) == 26 and {p["model"] for p in preds} == {"baseline", "tuned"}
    assert all(isinstance(p["correct"], bool) for p in preds)
    assert (out / "report" / "report.md").read_text().count("| ") > 13
    assert (out / "report" / "review.csv").is_file() and (out / "report" / "review.html").is_file()

    from PIL import Image

    png = (out / "report" / "abilities.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    chart = Image.open(io.BytesIO(png)).convert("L")
    lo, hi = chart.getextrema()
    assert chart.size[0] >= 600 and hi - lo > 100  # bars, axes and text: not blank

    # The synthetic items do not overlap the training data they were filtered against.
    bench_report = json.loads((out / "bench" / "synthetic" / "report.json").read_text())
    assert bench_report["items_per_ability"] == {a: 1 for a in abilities}

    assert summary["predictions"] == {"baseline": "made", "tuned": "made"}
    assert summary["trained_model_reused"] is False

    # Again on the same OUT: nothing is trained or predicted again; the same scores.
    stamp = (out / "predictions" / "predictions.parquet").stat().st_mtime_ns
    model = (out / "train" / "export" / "model.safetensors").stat().st_mtime_ns
    assert evaluate_job.main(["run", "--config", PRESET, "--out", str(out), *FAST]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trained_model_reused"] is True  # the export's lineage is this recipe
    assert summary["predictions"] == {"baseline": "reused", "tuned": "reused"}
    assert (out / "predictions" / "predictions.parquet").stat().st_mtime_ns == stamp
    assert (out / "train" / "export" / "model.safetensors").stat().st_mtime_ns == model
    again = json.loads((out / "report" / "scores.json").read_text())
    assert again["models"]["tuned"]["benchmarks"] == tuned["benchmarks"]
    assert "predictions reused from an earlier run" in (out / "report" / "report.md").read_text()

    # A longer answer limit: both models answer again; the export is still reused.
    longer = [*FAST, "predict.max_new_tokens=24"]
    assert evaluate_job.main(["run", "--config", PRESET, "--out", str(out), *longer]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["predictions"] == {"baseline": "made", "tuned": "made"}
    assert summary["trained_model_reused"] is True


def test_bad_presets_fail_before_any_work(tmp_path):
    cfg = load_evaluate_config(PRESET, ["models.other=/no/such/llava"])
    with pytest.raises(Exception, match="does not exist"):
        Plan(cfg, Path("raypipe/configs/evaluate"), tmp_path)
    cfg = load_evaluate_config(PRESET, ["training=null"])
    with pytest.raises(ConfigError, match="no `training` recipe"):
        Plan(cfg, Path("raypipe/configs/evaluate"), tmp_path)
    cfg = load_evaluate_config(PRESET, ["real=[{images: /nope, items: /nope.jsonl}]"])
    with pytest.raises(ConfigError, match="images /nope does not exist"):
        Plan(cfg, Path("raypipe/configs/evaluate"), tmp_path)
    cfg = load_evaluate_config(PRESET, ["benchmark=missing.yaml"])
    with pytest.raises(ConfigError, match="no generate preset named 'missing.yaml'"):
        Plan(cfg, Path("raypipe/configs/evaluate"), tmp_path)
    cfg = load_evaluate_config(PRESET, ["benchmark=sub/missing.yaml"])
    with pytest.raises(ConfigError, match="does not exist"):
        Plan(cfg, Path("raypipe/configs/evaluate"), tmp_path)
    with pytest.raises(ConfigError, match="models"):
        load_evaluate_config(PRESET, ["models={}"])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_build_takes_an_evaluation_preset(monkeypatch):
    """``build --config eval-tiny.yaml`` builds with the preset's benchmark generation."""
    seen = {}

    def fake_build(cfg, out, per_ability, training, benchmark):
        seen.update(cfg=cfg, per_ability=per_ability)
        return {"short_abilities": {}}

    monkeypatch.setattr("raypipe.evaluate.build.build_benchmark", fake_build)
    args = evaluate_job.parse_args(
        ["build", "--config", PRESET, "--out", "x", "--per-ability", "3"]
    )
    assert evaluate_job.run_build(args) == 0
    assert seen["cfg"].seed == 1000 and seen["cfg"].benchmark_question_mix
    assert seen["per_ability"] == 3
    # By preset name, from any folder: the evaluation preset (not the generation one).
    args = evaluate_job.parse_args(["build", "--config", "eval-tiny", "--out", "x"])
    assert evaluate_job.run_build(args) == 0
    assert seen["cfg"].seed == 1000
