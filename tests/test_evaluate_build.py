"""Building a synthetic benchmark through the generation job, with the overlap filter
against training data and bounded rounds that make up what it dropped."""

from __future__ import annotations

import pytest

from raypipe.config import load_config
from raypipe.evaluate.build import build_benchmark
from raypipe.evaluate.items import read_benchmark, read_benchmark_report
from raypipe.generate.config import GenerateConfig

pytestmark = pytest.mark.slow


def _cfg(**over) -> GenerateConfig:
    extra = [f"{k}={v}" for k, v in over.items()]
    return load_config(
        GenerateConfig, "raypipe/configs/generate/eval-tiny-bench.yaml", ["abilities=[color,animal]", *extra]
    )


def test_build_writes_typed_items_and_makes_up_for_overlaps(ray_local, tiny_dir, tmp_path):
    first = tmp_path / "first"
    report = build_benchmark(_cfg(), str(first), per_ability=2)
    items = read_benchmark(str(first)).to_pylist()
    assert report["items_per_ability"] == {"color": 2, "animal": 2}
    assert len(items) == 4 and not report["short_abilities"]
    for item in items:
        assert item["question"].endswith("?") and "<image>" not in item["question"]
        assert item["question_type"] in ("yes_no", "wh", "either_or")
        assert item["answer_keywords"] and item["image"]["bytes"][:4] == b"\x89PNG"
        assert item["benchmark"] == "synthetic" and item["prompt"]
    assert len({i["question_type"] for i in items}) >= 2

    # The same seed again, with the first benchmark's own rows as "training data": every
    # first-round item overlaps it and is dropped; a second round makes new rows.
    again = tmp_path / "again"
    report = build_benchmark(
        _cfg(), str(again), per_ability=2, training=[str(first / "generation" / "data")]
    )
    assert report["overlap_dropped"] >= 4
    assert report["attempts"][0]["short"] == {"color": 2, "animal": 2}
    assert report["items_per_ability"] == {"color": 2, "animal": 2}
    new = {i["id"] for i in read_benchmark(str(again)).to_pylist()}
    assert not new & {i["id"] for i in items}
    assert read_benchmark_report(str(again))["overlap_reasons"]
