"""The evaluation report: re-scoring published answers, the outputs, charts, and the
human-review sheet round trip (jobs/evaluate.py score)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.jobs import evaluate as job

ABILITIES = ["color", "animal", "vehicle"]


def answers(path: Path, bad_lines: bool = False) -> Path:
    """Predictions of two models on 3 abilities x 4 items, as JSONL (no images)."""
    lines = []
    for ability, colour in zip(ABILITIES, ["red", "dog", "bus"]):
        for i in range(4):
            base = {
                "id": f"{ability}-{i}",
                "ability": ability,
                "benchmark": "synthetic",
                "question": f"What is shown in picture {i}?",
                "question_type": "wh",
                "answer_keywords": [colour],
            }
            good = f"It is a {colour}." if i < 3 else "I cannot see it."
            lines.append(json.dumps({**base, "model": "tuned", "prediction": good}))
            lines.append(
                json.dumps({**base, "model": "base", "prediction": good if i < 1 else "Nothing."})
            )
    if bad_lines:
        lines.insert(2, "{not json")
        lines.insert(5, json.dumps({"id": "x", "ability": "color"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_published_answers_are_scored_into_every_output(tmp_path):
    out = tmp_path / "report"
    assert (
        job.main(["score", "--predictions", str(answers(tmp_path / "a.jsonl")), "--out", str(out)])
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    tuned = scores["models"]["tuned"]["benchmarks"]["synthetic"]
    base = scores["models"]["base"]["benchmarks"]["synthetic"]
    assert set(tuned["abilities"]) == set(ABILITIES)
    assert tuned["overall"]["n"] == 12 and tuned["overall"]["correct"] == 9
    assert base["overall"]["correct"] == 3
    s = tuned["abilities"]["color"]
    assert s["accuracy"] == 0.75 and 0 < s["ci_low"] < 0.75 < s["ci_high"] <= 1
    table = pq.read_table(out / "predictions.parquet")
    assert {"correct", "matched", "model", "prediction"} <= set(table.column_names)
    rows = table.to_pylist()
    hit = next(r for r in rows if r["id"] == "animal-0" and r["model"] == "tuned")
    assert hit["correct"] is True and hit["matched"] == "dog"
    report = (out / "report.md").read_text()
    assert "| color |" in report and "tuned" in report and "base" in report
    # The chart is a real, non-blank PNG.
    from PIL import Image

    png = (out / "abilities.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with Image.open(io.BytesIO(png)) as img:
        lo, hi = img.convert("L").getextrema()
        assert img.width > 400 and hi - lo > 100


def test_malformed_lines_are_reported_with_line_numbers_not_fatal(tmp_path, capsys):
    out = tmp_path / "report"
    path = answers(tmp_path / "a.jsonl", bad_lines=True)
    assert job.main(["score", "--predictions", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "line 3: not JSON" in err and "line 6: missing" in err
    problems = json.loads((out / "scores.json").read_text())["problems"]
    assert len(problems) == 2
    assert (
        job.main(["score", "--predictions", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    )


def test_human_review_sheet_round_trip(tmp_path):
    first = tmp_path / "r1"
    path = answers(tmp_path / "a.jsonl")
    assert job.main(["score", "--predictions", str(path), "--out", str(first), "--sheet"]) == 0
    assert (first / "review.html").read_text().startswith("<!doctype html>")
    sheet = first / "review.csv"
    with open(sheet, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["human_correct"] == "" for r in rows)
    # A reviewer marks the tuned model's answers: all right but one, and one bad mark.
    for r in rows:
        if r["model"] == "tuned":
            r["human_correct"] = "0" if r["id"] == "color-0" else "1"
    next(r for r in reversed(rows) if r["model"] == "base")["human_correct"] = "maybe"
    with open(sheet, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    second = tmp_path / "r2"
    args = ["score", "--predictions", str(first / "predictions.parquet"), "--review", str(sheet)]
    assert job.main([*args, "--out", str(second)]) == 0
    scores = json.loads((second / "scores.json").read_text())
    tuned = scores["models"]["tuned"]["benchmarks"]["synthetic"]["overall"]
    assert tuned["human_accuracy"] == pytest.approx(11 / 12)
    assert "human_accuracy" not in scores["models"]["base"]["benchmarks"]["synthetic"]["overall"]
    assert any("not 1 or 0" in p for p in scores["problems"])
    assert "human 92%" in (second / "report.md").read_text()


def test_import_job_reports_bad_lines_and_writes_the_benchmark(tmp_path, capsys):
    from PIL import Image

    from raypipe.evaluate.items import read_benchmark

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (200, 20, 20)).save(images / "red.png")
    (images / "broken.png").write_bytes(b"not a png")
    good = {
        "image": "red.png",
        "ability": "color",
        "question": "What colour is the square?",
        "question_type": "wh",
        "answer_keywords": ["red"],
    }
    lines = [
        json.dumps(good),
        "{oops",
        json.dumps({**good, "image": "broken.png", "question": "And this one?"}),
        json.dumps({**good, "ability": "no-such-ability", "question": "Which colour?"}),
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "bench"
    args = ["import", "--images", str(images), "--items", str(tmp_path / "items.jsonl")]
    assert job.main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and "line 4" in err and "line 1:" not in err
    items = read_benchmark(str(out)).to_pylist()
    assert [i["ability"] for i in items] == ["color"] and items[0]["answer_keywords"] == ["red"]


def test_score_with_an_llm_judge_reports_it_beside_the_keyword_score(
    tmp_path, llm_server, monkeypatch
):
    def judge(messages):  # grades 1 when the reference keyword is in the answer
        text = messages[-1]["content"]
        if "Reference answer:" not in text:  # the endpoint check's probe
            return "ok"
        reference = text.split("Reference answer:", 1)[1].splitlines()[0]
        answer = text.split("Model's answer:", 1)[1].splitlines()[0].lower()
        words = [w.strip(" .:,") for w in reference.lower().split()]
        return "1" if any(w and w in answer for w in words[-1:]) else "0"

    server = llm_server(responder=judge)
    monkeypatch.setenv("RAYPIPE_JUDGE_KEY", "sk-test")
    out = tmp_path / "report"
    args = ["score", "--predictions", str(answers(tmp_path / "a.jsonl")), "--out", str(out)]
    judge_args = ["--judge", f"test-model@{server.url}", "--judge-key-env", "RAYPIPE_JUDGE_KEY"]
    assert job.main([*args, *judge_args]) == 0
    scores = json.loads((out / "scores.json").read_text())
    tuned = scores["models"]["tuned"]["benchmarks"]["synthetic"]["overall"]
    assert tuned["judge_accuracy"] == pytest.approx(0.75)
    assert scores["models"]["tuned"]["judge_agreement"] == 1.0
    assert scores["judge"]["judged"] == 24
    assert "judge 75%" in (out / "report.md").read_text()
    sent = server.total_requests
    assert job.main([*args, *judge_args]) == 0  # answered from OUT/cache
    assert server.total_requests == sent
