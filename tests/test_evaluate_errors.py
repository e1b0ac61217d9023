"""Every item counts: a model whose predictions failed on some items is scored on the
same items as the others, each failure exactly a wrong answer, and ``errors`` shown."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from raypipe.evaluate.report import read_predictions, write_report

ITEMS = [
    {
        "id": f"color-{i}",
        "benchmark": "synthetic",
        "ability": "color",
        "question": "What color is the car?",
        "question_type": "wh",
        "answer_keywords": ["red"],
    }
    for i in range(10)
]


def rows_for(model: str, predictions: list[str | None], errors: dict | None = None) -> list:
    return [
        {**item, "model": model, "prediction": p, "error": (errors or {}).get(i)}
        for i, (item, p) in enumerate(zip(ITEMS, predictions))
    ]


def test_failed_predictions_score_exactly_as_wrong_answers(tmp_path):
    right, wrong = "It is red.", "It is blue."
    # A answers all 10, 5 right. B: the same 5 right, and fails on the other 5
    # (prediction None, error set, as predict writes it). C: B's 5 right, the rest wrong.
    a = rows_for("a", [right] * 5 + [wrong] * 5)
    failures = {i: "timeout after 3 attempts" for i in range(5, 10)}
    b = rows_for("b", [right] * 5 + [None] * 5, failures)
    c = rows_for("c", [right] * 5 + [wrong] * 5)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in a + b + c))
    rows, problems = read_predictions(path)
    assert problems == [] and len(rows) == 30  # failed rows are kept, not skipped

    result = write_report(rows, tmp_path / "report")
    table = {m: result["models"][m]["benchmarks"]["synthetic"]["overall"] for m in "abc"}
    assert table["b"]["n"] == 10 and table["b"]["errors"] == 5
    assert table["b"]["accuracy"] == 0.5
    same = ("n", "correct", "accuracy", "ci_low", "ci_high")
    assert {k: table["b"][k] for k in same} == {k: table["c"][k] for k in same}
    assert table["a"]["errors"] == table["c"]["errors"] == 0
    on_disk = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert on_disk["models"]["b"]["benchmarks"]["synthetic"]["abilities"]["color"]["errors"] == 5
    assert "(n=10, 5 errors)" in (tmp_path / "report" / "report.md").read_text()
    scored = pq.read_table(tmp_path / "report" / "predictions.parquet").to_pylist()
    failed = [r for r in scored if r["model"] == "b" and r["error"]]
    assert len(failed) == 5
    assert all(r["correct"] is False and r["verdict_reason"] == "error" for r in failed)


def test_a_model_missing_items_is_scored_on_the_same_items(tmp_path):
    # B has no rows at all for 4 of the 10 items A answered (a crashed chunk, a
    # hand-edited file): they are its failures, not items left out of its score.
    a = [{**r, "judge_correct": True, "latency_s": 0.5} for r in rows_for("a", ["red"] * 10)]
    b = rows_for("b", ["red"] * 6)
    result = write_report(a + b, tmp_path / "report")
    overall = result["models"]["b"]["benchmarks"]["synthetic"]["overall"]
    assert (overall["n"], overall["correct"], overall["errors"]) == (10, 6, 4)
    assert result["models"]["a"]["benchmarks"]["synthetic"]["overall"]["n"] == 10
    # The filled-in rows are b's failures: a's answer fields are not copied to them.
    b_table = result["models"]["b"]["benchmarks"]["synthetic"]["overall"]
    assert "judge_accuracy" not in b_table
