"""No stale results: predictions are made again when the predict settings or the model
change, and a tuned model is trained again when the preset's training recipe changes;
what is reused is said in models.json and the report."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from raypipe.config import load_config
from raypipe.evaluate import run as run_mod
from raypipe.evaluate.config import PredictSettings
from raypipe.evaluate.inference import EvalModel
from raypipe.evaluate.items import write_benchmark
from raypipe.generate.config import GenerateConfig
from raypipe.train.config import load_train_config


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bench(tmp_path) -> str:
    out = str(tmp_path / "bench")
    items = [
        {
            "id": f"color-{i}",
            "benchmark": "synthetic",
            "ability": "color",
            "image": png(),
            "question": "What color is the square?",
            "question_type": "wh",
            "answer_keywords": ["red"],
        }
        for i in range(3)
    ]
    write_benchmark(out, items)
    return out


@pytest.fixture
def models(tmp_path) -> list[EvalModel]:
    out = []
    for name in ("a", "b"):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights " + name.encode())
        (folder / "raypipe_lineage.json").write_text(json.dumps({"config": {"lr": 1e-3}}))
        out.append(EvalModel(name=name, kind="local", path=str(folder)))
    return out


@pytest.fixture
def predictions(monkeypatch) -> list:
    """Each (model, max_new_tokens) that was asked to predict; the answer says "red"."""
    calls = []

    def fake_predict(items, model, **kw):
        calls.append((model.name, kw["max_new_tokens"]))
        return [
            {**{k: v for k, v in r.items() if k != "image"}, "model": model.name,
             "prediction": f"red ({kw['max_new_tokens']})", "error": None}
            for r in items.to_pylist()
        ]  # fmt: skip

    monkeypatch.setattr("raypipe.evaluate.inference.predict", fake_predict)
    return calls


def test_predictions_are_reused_only_for_the_same_settings_and_model(
    tmp_path, bench, models, predictions
):
    out = tmp_path / "predictions"
    settings = PredictSettings(max_new_tokens=16)
    assert run_mod.predict_step(models, [bench], out, settings) == {"a": "made", "b": "made"}
    assert sorted(predictions) == [("a", 16), ("b", 16)]

    # The same again: nothing is predicted, and models.json says so.
    predictions.clear()
    assert run_mod.predict_step(models, [bench], out, settings) == {"a": "reused", "b": "reused"}
    assert predictions == []
    facts = json.loads((out / "models.json").read_text())
    assert {m: f["predictions"] for m, f in facts.items()} == {"a": "reused", "b": "reused"}

    # Raising max_new_tokens makes every model answer again.
    longer = PredictSettings(max_new_tokens=64)
    assert run_mod.predict_step(models, [bench], out, longer) == {"a": "made", "b": "made"}
    assert sorted(predictions) == [("a", 64), ("b", 64)]
    # num_actors changes no answer: still reused.
    predictions.clear()
    more_actors = PredictSettings(max_new_tokens=64, num_actors=2)
    assert run_mod.predict_step(models, [bench], out, more_actors)["a"] == "reused"

    # Model a's weights rewritten in place (same path): only a answers again; b's rows
    # are kept as they were.
    weights = Path(models[0].path) / "model.safetensors"
    weights.write_bytes(b"new weights, longer than before")
    assert run_mod.predict_step(models, [bench], out, longer) == {"a": "made", "b": "reused"}
    assert predictions == [("a", 64)]
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted((r["model"], r["prediction"]) for r in rows) == sorted(
        [("a", "red (64)")] * 3 + [("b", "red (64)")] * 3
    )

    # Same size, new modification time (a re-export of the same shape): predicted again.
    predictions.clear()
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run_mod.predict_step(models, [bench], out, longer)["a"] == "made"

    # The report says which predictions were reused.
    run_mod.score_all(out / "predictions.parquet", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**a**" in report and "predicted now" in report
    assert "**b**" in report and "predictions reused from an earlier run" in report
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert scores["models"]["b"]["predictions"] == "reused"


@pytest.fixture
def training(monkeypatch):
    """make_trained_model's generation and training, faked: each fit writes an export
    whose lineage is the real lineage record of the config it was given."""
    from raypipe.train.export import LINEAGE_FILE, lineage_record

    fits = []

    def fake_setup(cfg, sources, out_dir, resume=True):
        return SimpleNamespace(cfg=cfg, out=Path(out_dir)), None

    def fake_fit(plan, dataset):
        fits.append(plan.cfg.lr)
        export = plan.out / "export"
        export.mkdir(parents=True, exist_ok=True)
        record = json.dumps(lineage_record(plan.cfg))
        (export / LINEAGE_FILE).write_text(record)
        (export / "config.json").write_text("{}")
        (export / "README.md").write_text("card")
        return SimpleNamespace(export_dir=str(export))

    monkeypatch.setattr("raypipe.generate.pipeline.generate", lambda cfg, out: {})
    monkeypatch.setattr("raypipe.train.trainer.preflight", lambda cfg, sources: (cfg, sources))
    monkeypatch.setattr("raypipe.train.trainer.setup", fake_setup)
    monkeypatch.setattr("raypipe.train.trainer.main", fake_fit)
    return fits


def recipe_plan(out: Path, overrides: list[str]) -> SimpleNamespace:
    gen = load_config(GenerateConfig, "raypipe/configs/generate/demo.yaml", [])
    train = load_train_config("raypipe/configs/train/tiny.yaml", overrides)
    return SimpleNamespace(out=out, train_gen_cfg=gen, train_cfg=train)


def test_a_changed_training_recipe_trains_again(tmp_path, training):
    out = tmp_path / "eval"
    export, reused = run_mod.make_trained_model(recipe_plan(out, ["lr=0.001"]))
    assert export == out / "train" / "export" and not reused and training == [0.001]

    # The same recipe: the export is reused, nothing trained.
    export, reused = run_mod.make_trained_model(recipe_plan(out, ["lr=0.001"]))
    assert reused and training == [0.001]

    # Another learning rate in the preset's recipe: trained again, the old run kept aside.
    export, reused = run_mod.make_trained_model(recipe_plan(out, ["lr=0.01"]))
    assert not reused and training == [0.001, 0.01]
    (aside,) = [p for p in out.iterdir() if p.name.startswith("train.replaced-")]
    assert (aside / "export" / "README.md").is_file()
    lineage = json.loads((export / "raypipe_lineage.json").read_text())
    assert lineage["config"]["lr"] == 0.01
