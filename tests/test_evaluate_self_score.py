"""Generated benchmark items score their own answer: an item whose keywords contradict
its reference response is rejected at build with a reason, and the ability is made up
by more rows; each item carries its ability's keyword bank as candidates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from raypipe.config import load_config
from raypipe.evaluate.build import build_benchmark, self_score
from raypipe.evaluate.items import read_benchmark, read_benchmark_rejects, read_benchmark_report
from raypipe.generate.config import GenerateConfig
from raypipe.schema import SAMPLE_SCHEMA, rows_to_table


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def sample(i: int, question: str, qtype: str, response: str, keywords: list[str]) -> dict:
    return {
        "id": f"s-color-{i:03d}",
        "ability": "color",
        "keywords": ["red"],
        "prompt": "a ((red)) car",
        "negative_prompt": "",
        "seed": i,
        "image": {"bytes": png(), "path": None},
        "width": 8,
        "height": 8,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": response},
        ],
        "answer_keywords": keywords,
        "question_type": qtype,
        "sd_model": "tiny",
        "llm_model": "offline",
        "meta": "{}",
    }


SAMPLES = [
    sample(0, "Is the car red?", "yes_no", "Yes, the car is red.", ["yes", "red"]),
    # Keywords say no, the response says yes: its own reference would score wrong.
    sample(1, "Is the car red?", "yes_no", "Yes, the car is red.", ["no", "red"]),
    # The keyword line does not start with yes/no: unscorable for every model.
    sample(2, "Is the car red?", "yes_no", "Yes, the car is red.", ["crimson", "red", "no"]),
    sample(3, "What color is the car?", "wh", "The car is red.", ["red"]),
    # The response denies its own keyword.
    sample(4, "What color is the car?", "wh", "The car is not red, it is blue.", ["red"]),
    # Two options named where the keyword picks one.
    sample(5, "Is the car red or blue?", "either_or", "It is red and blue.", ["red"]),
    sample(6, "Is the car red or blue?", "either_or", "It is red.", ["red"]),
    # The response lists candidates of the bank beside its keyword.
    sample(7, "What color is the car?", "wh", "Red, blue or green.", ["red"]),
]
BANK = ["red", "blue", "green", "yellow"]

EXPECTED_REJECTS = {
    "s-color-001": "keywords_contradict_response",
    "s-color-002": "yes_no_keyword",
    "s-color-004": "self_score:negated",
    "s-color-005": "self_score:both_options",
    "s-color-007": "self_score:several_answers",
}


def test_self_score_rejects_items_that_contradict_their_response():
    items = [
        {
            "id": s["id"],
            "ability": "color",
            "question": s["conversations"][0]["value"].split("\n", 1)[1],
            "question_type": s["question_type"],
            "answer_keywords": s["answer_keywords"],
            "candidates": BANK,
        }
        for s in SAMPLES
    ]
    responses = {s["id"]: s["conversations"][1]["value"] for s in SAMPLES}
    kept, rejects = self_score(items, responses)
    assert [i["id"] for i in kept] == ["s-color-000", "s-color-003", "s-color-006"]
    assert {r["id"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["stage"] == "self_score" for r in rejects)
    raw = json.loads(next(r["raw"] for r in rejects if r["id"] == "s-color-001"))
    assert raw["response"] == "Yes, the car is red." and raw["keywords"][0] == "no"


def test_build_rejects_them_with_a_reason_and_keeps_the_bank(tmp_path, monkeypatch):
    calls = []

    def fake_generate(cfg, out):
        # One generation run's OUT: its samples, and its saved keyword bank.
        calls.append(cfg.num_samples)
        data = Path(out) / "data"
        data.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_to_table(SAMPLES, SAMPLE_SCHEMA), data / "part-0.parquet")
        (Path(out) / "keywords").mkdir(exist_ok=True)
        bank = {"ability": "color", "keywords": BANK}
        (Path(out) / "keywords" / "color.json").write_text(json.dumps(bank))
        return {"accepted": len(SAMPLES)}

    monkeypatch.setattr("raypipe.generate.pipeline.generate", fake_generate)
    cfg = load_config(GenerateConfig, "raypipe/configs/generate/demo.yaml", ["abilities=[color]"])
    out = str(tmp_path / "bench")
    report = build_benchmark(cfg, out, per_ability=3, max_attempts=2)

    items = read_benchmark(out).to_pylist()
    assert sorted(i["id"] for i in items) == ["s-color-000", "s-color-003", "s-color-006"]
    assert all(i["candidates"] == BANK for i in items)
    rejects = read_benchmark_rejects(out).to_pylist()
    assert {r["id"]: (r["stage"], r["reason"]) for r in rejects} == {
        k: ("self_score", v) for k, v in EXPECTED_REJECTS.items()
    }
    assert report["self_score_dropped"] == 5 and report["overlap_dropped"] == 0
    assert report["self_score_reasons"]["keywords_contradict_response"] == 1
    assert read_benchmark_report(out)["items_per_ability"] == {"color": 3}
    assert calls == [3]  # three good items: no second round asked for


def test_imports_check_the_yes_no_keyword_and_take_the_catalog_bank(tmp_path):
    from raypipe.abilities import load_catalog
    from raypipe.evaluate.import_real import import_real
    from raypipe.evaluate.score import score_answer

    images = tmp_path / "images"
    images.mkdir()
    (images / "car.png").write_bytes(png())
    base = {"image": "car.png", "ability": "color", "question": "Is the car red?"}
    lines = [
        {**base, "question_type": "yes_no", "answer_keywords": ["yes"]},
        # "yes" is there, but not first: scoring reads the first keyword.
        {**base, "question_type": "yes_no", "answer_keywords": ["red", "yes"]},
        {**base, "question": "What color is the car?", "question_type": "wh",
         "answer_keywords": ["red"]},
    ]  # fmt: skip
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    catalog = load_catalog(names=["color"])
    report = import_real(str(images), str(jsonl), str(tmp_path / "real"), abilities=catalog)
    assert report.imported == 2
    assert [(b["line"], b["reason"]) for b in report.bad_lines] == [(2, "bad_yes_no")]
    wh_item = next(
        i for i in read_benchmark(str(tmp_path / "real")).to_pylist() if i["question_type"] == "wh"
    )
    assert set(catalog["color"].keywords) <= set(wh_item["candidates"])
    other = next(k for k in catalog["color"].keywords if "red" not in k)
    assert score_answer(wh_item, f"Red or {other}.").reason == "several_answers"
    assert score_answer(wh_item, "Red.").correct
