"""Export of OUT/data Parquet to LLaVA's JSON + image folder."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.errors import RaypipeError
from raypipe.generate.export import export_llava
from raypipe.schema import SAMPLE_SCHEMA, rows_to_table


def image_bytes(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def sample(sid: str, image: dict | None, conversations=True) -> dict:
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the car?"},
        {"from": "gpt", "value": "The car is crimson."},
    ]
    return {
        "id": sid,
        "ability": "color",
        "keywords": ["crimson"],
        "prompt": "((crimson)) car",
        "negative_prompt": "",
        "seed": 1,
        "image": image,
        "width": 16,
        "height": 16,
        "conversations": turns if conversations else [],
        "answer_keywords": [],
        "question_type": "caption",
        "sd_model": "raypipe-tiny/tiny-sd",
        "llm_model": "offline",
        "meta": "{}",
    }


@pytest.fixture
def data_dir(tmp_path):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    png, jpg = image_bytes(0, "PNG"), image_bytes(1, "JPEG")
    part1 = [
        sample("color-s0-0000000", {"bytes": png, "path": "color-s0-0000000.png"}),
        sample("color-s0-0000001", {"bytes": jpg, "path": None}),  # extension from bytes
        sample("color-s0-0000002", None),
    ]
    part2 = [
        sample("color-s0-0000003", {"bytes": png, "path": "x.png"}, conversations=False),
        sample("color-s0-0000000", {"bytes": png, "path": "color-s0-0000000.png"}),  # repeat
        sample("animal-s0-0000000", {"bytes": jpg, "path": "animal-s0-0000000.jpg"}),
    ]
    pq.write_table(rows_to_table(part1, SAMPLE_SCHEMA), data / "part-0.parquet")
    pq.write_table(rows_to_table(part2, SAMPLE_SCHEMA), data / "part-1.parquet")
    return data, png, jpg


def test_export_writes_llava_json_and_images(data_dir, tmp_path):
    data, png, jpg = data_dir
    out = tmp_path / "llava"
    report = export_llava(data, out)

    entries = json.loads((out / "llava.json").read_text())
    assert [e["id"] for e in entries] == [
        "color-s0-0000000",
        "color-s0-0000001",
        "animal-s0-0000000",
    ]
    assert report.rows == 3 and report.json_path == out / "llava.json"
    for e in entries:
        assert set(e) == {"id", "image", "conversations"}
        assert e["conversations"][0] == {
            "from": "human",
            "value": "<image>\nWhat colour is the car?",
        }
        assert (out / e["image"]).is_file()  # relative to the export folder
    assert entries[0]["image"] == "images/color-s0-0000000.png"
    assert entries[1]["image"] == "images/color-s0-0000001.jpg"
    assert (out / "images/color-s0-0000000.png").read_bytes() == png  # bytes as stored
    assert (out / "images/animal-s0-0000000.jpg").read_bytes() == jpg
    assert report.image_bytes == len(png) + 2 * len(jpg)
    assert report.skipped == {
        "color-s0-0000002": "no image bytes",
        "color-s0-0000003": "no conversation",
        "color-s0-0000000 (repeat)": "duplicate id",
    }
    assert "skipped 3 rows" in report.summary()


def test_cli(data_dir, tmp_path):
    data, _, _ = data_dir
    script = Path(__file__).resolve().parents[1] / "jobs" / "export_llava.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--data", str(data), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote 3 samples" in ok.stdout
    assert len(json.loads((tmp_path / "cli" / "llava.json").read_text())) == 3
    bad = subprocess.run(
        [sys.executable, str(script), "--data", str(tmp_path / "nowhere"), "--out", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cannot read Parquet" in bad.stderr


def test_not_a_sample_table(tmp_path):
    pq.write_table(rows_to_table([{"id": "a"}], SAMPLE_SCHEMA.remove(6)), tmp_path / "p.parquet")
    with pytest.raises(RaypipeError, match="missing columns"):
        export_llava(tmp_path, tmp_path / "out")
