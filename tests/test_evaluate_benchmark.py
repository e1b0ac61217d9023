"""Benchmark items: the Parquet form and its folder, real-image imports (bad lines are
reported with their numbers, never fatal), and the training-overlap filter."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fixture_data import write_fixture_run
from PIL import Image

from raypipe.abilities import ABILITIES
from raypipe.errors import ConfigError
from raypipe.evaluate import overlap as bm
from raypipe.evaluate.import_real import import_real
from raypipe.evaluate.items import (
    BENCHMARK_SCHEMA,
    items_from_samples,
    items_to_table,
    read_benchmark,
    read_benchmark_rejects,
    read_benchmark_report,
    validate_items,
    write_benchmark,
)
from raypipe.evaluate.overlap import overlap_filter, read_training_prompts
from raypipe.schema import REJECT_COLUMNS


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def real_folder(root: Path) -> tuple[Path, Path, list[str]]:
    """Images and a JSONL with good and bad lines; returns (images, jsonl, lines)."""
    images = root / "images"
    images.mkdir(parents=True)
    (images / "red.png").write_bytes(image_bytes((220, 20, 20)))
    (images / "cat.jpg").write_bytes(image_bytes((120, 120, 90), "JPEG"))
    (images / "sub").mkdir()
    (images / "sub" / "bus.bmp").write_bytes(image_bytes((240, 200, 0), "BMP"))
    (images / "broken.png").write_bytes(image_bytes((1, 2, 3))[:40])  # truncated PNG
    good_yes_no = {
        "image": "red.png",
        "ability": "color",
        "question": "Is the square red?",
        "question_type": "yes_no",
        "answer_keywords": ["yes"],
    }
    lines = [
        json.dumps(good_yes_no),  # 1 good
        "",  # 2 blank: skipped
        '{"image": "red.png", "ability": "color",',  # 3 bad JSON
        json.dumps({**good_yes_no, "question": None}),  # 4 missing question
        json.dumps({**good_yes_no, "question_type": "caption"}),  # 5 unknown type
        json.dumps({**good_yes_no, "image": "nowhere.png"}),  # 6 missing image
        json.dumps({**good_yes_no, "image": "broken.png"}),  # 7 corrupt image bytes
        json.dumps({**good_yes_no, "ability": "weather"}),  # 8 unknown ability
        json.dumps(  # 9 good: either-or with options, match all, synonyms
            {
                "image": "cat.jpg",
                "ability": "animal",
                "question": "Which animal is this, the cat or the dog?",
                "question_type": "either_or",
                "answer_keywords": ["cat", "tabby"],
                "options": ["cat", "dog"],
                "match": "all",
                "synonyms": {"cat": ["kitten", "kitty"]},
            }
        ),
        json.dumps(  # 10 good: either-or, options parsed from the question; extra field
            {
                "image": "sub/bus.bmp",
                "ability": "vehicle",
                "question": "Is this a bus or a train?",
                "question_type": "either_or",
                "answer_keywords": ["bus"],
                "note": "from the street set",
            }
        ),
        json.dumps(good_yes_no, indent=None, separators=(",", ":")),  # 11 repeats line 1
        json.dumps({**good_yes_no, "answer_keywords": ["red"]}),  # 12 yes_no without yes/no
        "[1, 2]",  # 13 not an object
        json.dumps(  # 14 either-or with no choices
            {**good_yes_no, "question_type": "either_or", "answer_keywords": ["red"]}
        ),
        json.dumps({**good_yes_no, "answer_keywords": []}),  # 15 empty keywords
        json.dumps({**good_yes_no, "match": "most", "image": "cat.jpg"}),  # 16 bad match
        json.dumps(  # 17 good: wh
            {
                "image": "cat.jpg",
                "ability": "animal",
                "question": "What animal is in the picture?",
                "question_type": "wh",
                "answer_keywords": ["cat"],
            }
        ),
    ]
    jsonl = root / "items.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return images, jsonl, lines


EXPECTED_BAD = {
    3: "bad_json",
    4: "missing_field:question",
    5: "unknown_question_type",
    6: "missing_image",
    7: "bad_image",
    8: "unknown_ability",
    11: "duplicate_item",
    12: "bad_yes_no",
    13: "not_an_object",
    14: "no_options",
    15: "empty_field:answer_keywords",
    16: "bad_match",
}


def test_import_real_reports_bad_lines_and_imports_the_rest(tmp_path):
    images, jsonl, lines = real_folder(tmp_path / "src")
    out = tmp_path / "bench"
    report = import_real(str(images), str(jsonl), str(out), abilities=ABILITIES)

    assert {b["line"]: b["reason"] for b in report.bad_lines} == EXPECTED_BAD
    assert [b["line"] for b in report.bad_lines] == sorted(EXPECTED_BAD)
    messages = {b["line"]: b["message"] for b in report.bad_lines}
    assert "same item as line 1" in messages[11]
    assert "nowhere.png" in messages[6] and "not found" in messages[6]
    assert "weather" in messages[8] and "color" in messages[8]
    assert "caption" in messages[5] and "either_or" in messages[5]
    assert report.lines == len(lines) - 1  # the blank line is not counted
    assert (report.imported, report.rejected) == (4, len(EXPECTED_BAD))
    assert report.per_ability == {"animal": 2, "color": 1, "vehicle": 1}
    assert report.per_question_type == {"either_or": 2, "wh": 1, "yes_no": 1}
    assert report.ignored_fields == {"note": [10]}

    # Rejects: one row per bad line, the line as given.
    rejects = read_benchmark_rejects(str(out)).to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == {
        f"real-line-{n}": reason for n, reason in EXPECTED_BAD.items()
    }
    by_id = {r["id"]: r for r in rejects}
    for n in EXPECTED_BAD:
        assert by_id[f"real-line-{n}"]["raw"] == lines[n - 1]
        assert by_id[f"real-line-{n}"]["stage"] == "import"
    assert by_id["real-line-8"]["ability"] == "weather"

    # Items: every field, images as bytes.
    table = read_benchmark(str(out))
    assert table.schema.equals(BENCHMARK_SCHEMA, check_metadata=True)
    assert validate_items(table) == []
    items = {r["source"]: r for r in table.to_pylist()}
    assert set(items) == {"items.jsonl:1", "items.jsonl:9", "items.jsonl:10", "items.jsonl:17"}
    first = items["items.jsonl:1"]
    assert first["id"].startswith("real-color-") and first["benchmark"] == "real"
    assert first["image"] == {
        "bytes": (images / "red.png").read_bytes(),
        "path": "red.png",
    }
    assert (first["question"], first["question_type"]) == ("Is the square red?", "yes_no")
    assert (first["answer_keywords"], first["options"]) == (["yes"], [])
    assert (first["match"], json.loads(first["synonyms"]), first["prompt"]) == ("any", {}, "")
    cat = items["items.jsonl:9"]
    assert cat["image"]["bytes"] == (images / "cat.jpg").read_bytes()  # JPEG as given
    assert (cat["options"], cat["match"]) == (["cat", "dog"], "all")
    assert json.loads(cat["synonyms"]) == {"cat": ["kitten", "kitty"]}
    assert cat["answer_keywords"] == ["cat", "tabby"]
    bus = items["items.jsonl:10"]
    assert bus["options"] == []  # kept as given; the question reads "X or Y"
    with Image.open(io.BytesIO(bus["image"]["bytes"])) as img:  # BMP stored as PNG
        assert (img.format, img.size) == ("PNG", (24, 16))
    assert bus["image"]["path"] == "sub/bus.bmp"

    saved = read_benchmark_report(str(out))
    assert saved["benchmark"] == "real" and saved["items"] == 4
    assert saved["rejects"] == len(EXPECTED_BAD)
    assert [b["line"] for b in saved["bad_lines"]] == sorted(EXPECTED_BAD)
    assert saved["per_ability"] == report.per_ability
    assert len(saved["parts"]["items"]) == 1 and len(saved["parts"]["rejects"]) == 1
    # Only columns asked for are read.
    light = read_benchmark(str(out), columns=["id", "ability"])
    assert light.column_names == ["id", "ability"] and light.num_rows == 4


def test_import_ids_are_stable_and_a_reimport_replaces_the_benchmark(tmp_path):
    images, jsonl, lines = real_folder(tmp_path / "src")
    out = str(tmp_path / "bench")
    import_real(str(images), str(jsonl), out)  # no catalog: any ability is accepted
    before = {r["source"].split(":")[1]: r["id"] for r in read_benchmark(out).to_pylist()}
    assert len(before) == 5  # line 8's ability "weather" is accepted without a catalog

    # The same good lines, reordered and re-spaced, fixed line 6, and nothing else.
    good = [json.loads(lines[n - 1]) for n in (17, 9, 1)]
    fixed = {**json.loads(lines[5]), "image": "red.png", "question": "Is it red?"}
    (tmp_path / "v2.jsonl").write_text(
        "\n".join(json.dumps(g, indent=None, separators=(", ", ": ")) for g in [*good, fixed])
    )
    report = import_real(str(images), str(tmp_path / "v2.jsonl"), out)
    assert report.bad_lines == [] and report.imported == 4
    after = {r["id"]: r for r in read_benchmark(out).to_pylist()}
    assert {before["17"], before["9"], before["1"]} <= set(after)  # same ids
    assert {r["source"] for r in after.values()} == {f"v2.jsonl:{n}" for n in (1, 2, 3, 4)}
    # The old parts are gone: the folder holds the new benchmark only.
    assert read_benchmark_rejects(out).num_rows == 0
    assert len(list((Path(out) / "items").glob("*.parquet"))) == 1
    assert not list((Path(out) / "rejects").glob("*.parquet"))

    with pytest.raises(ConfigError, match="holds benchmark 'real'"):
        import_real(str(images), str(tmp_path / "v2.jsonl"), out, benchmark="other")
    import_real(str(images), str(tmp_path / "v2.jsonl"), out, benchmark="other", overwrite=True)
    assert set(read_benchmark(out).column("benchmark").to_pylist()) == {"other"}


def test_import_user_errors_are_fatal_with_what_to_do(tmp_path):
    images, jsonl, _ = real_folder(tmp_path / "src")
    with pytest.raises(ConfigError, match="image folder .* does not exist"):
        import_real(str(tmp_path / "nope"), str(jsonl), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="items file .* does not exist"):
        import_real(str(images), str(tmp_path / "nope.jsonl"), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_benchmark(str(tmp_path / "never-written"))


def sample_items(n: int = 3) -> list[dict]:
    return [
        {
            "id": f"synthetic-color-{i}",
            "benchmark": "synthetic",
            "ability": "color",
            "image": image_bytes((10 * i, 0, 0)),
            "question": "Is the car red or blue?",
            "question_type": "either_or",
            "answer_keywords": ["red"],
            "options": ["red", "blue"] if i else None,
            "synonyms": {"red": ["crimson"]} if i == 2 else None,
            "prompt": f"a ((red)) car number {i}, city street",
            "source": "offline",
        }
        for i in range(n)
    ]


def test_benchmark_round_trip(tmp_path):
    out = str(tmp_path / "bench")
    table = items_to_table(sample_items())
    assert validate_items(table) == []
    rejects = [
        {
            "id": "x",
            "ability": "color",
            "stage": "overlap",
            "reason": "keyword_overlap",
            "raw": "{}",
        }
    ]
    summary = write_benchmark(out, table, rejects, {"note": "kept"})
    assert summary["benchmark"] == "synthetic" and summary["note"] == "kept"
    assert summary["per_ability"] == {"color": 3} and summary["reject_reasons"] == {
        "keyword_overlap": 1
    }

    back = read_benchmark(out)
    assert back.equals(table)  # every value, types included
    assert back.schema.metadata == BENCHMARK_SCHEMA.metadata  # datasets reads it as Image
    rows = back.to_pylist()
    assert rows[0]["options"] == [] and rows[0]["match"] == "any" and rows[0]["synonyms"] == "{}"
    assert json.loads(rows[2]["synonyms"]) == {"red": ["crimson"]}
    assert rows[1]["image"]["bytes"] == image_bytes((10, 0, 0))
    assert read_benchmark_rejects(out).column_names == list(REJECT_COLUMNS)
    assert read_benchmark_rejects(out).to_pylist() == rejects
    assert read_benchmark_report(out)["parts"]["items"] == [
        p.name for p in (tmp_path / "bench" / "items").glob("*.parquet")
    ]
    # The parts are plain Parquet with the image struct, as datasets expects.
    part = next((tmp_path / "bench" / "items").glob("*.parquet"))
    assert pq.read_schema(part).field("image").type == BENCHMARK_SCHEMA.field("image").type

    # A part listed in the report must be there; temporary files are never read.
    (tmp_path / "bench" / "items" / ".tmp-killed-part.parquet").write_bytes(b"half")
    assert read_benchmark(out).num_rows == 3
    part.unlink()
    with pytest.raises(ConfigError, match="listed in report.json, is missing"):
        read_benchmark(out)

    # Bad items are refused before anything is written.
    bad = sample_items(2)
    bad[1]["question_type"] = "caption"
    bad[0]["match"] = "most"
    with pytest.raises(ValueError, match="question_type 'caption'"):
        write_benchmark(str(tmp_path / "b2"), bad)
    with pytest.raises(ValueError, match="one name per folder"):
        write_benchmark(
            str(tmp_path / "b3"), [*sample_items(1), {**sample_items(2)[1], "benchmark": "real"}]
        )
    assert not (tmp_path / "b2").exists()


def test_benchmark_on_a_uri(tmp_path, s3_server):
    bucket = s3_server.make_bucket(f"bench-{uuid.uuid4().hex[:8]}")
    images, jsonl, _ = real_folder(tmp_path / "src")
    out = s3_server.uri(bucket, "benchmarks/real")
    report = import_real(str(images), str(jsonl), out, abilities=ABILITIES)
    assert {b["line"]: b["reason"] for b in report.bad_lines} == EXPECTED_BAD
    table = read_benchmark(out)
    assert table.num_rows == 4 and validate_items(table) == []
    assert read_benchmark_rejects(out).num_rows == len(EXPECTED_BAD)
    assert read_benchmark_report(out)["items"] == 4
    selector = pafs.FileSelector(f"{bucket}/benchmarks/real", recursive=True)
    names = [i.base_name for i in s3_server.filesystem().get_file_info(selector)]
    assert "report.json" in names and not [n for n in names if n.startswith(".tmp")]


def test_items_from_samples(tmp_path):
    out = write_fixture_run(str(tmp_path / "run"), 4)
    samples = pq.read_table(next((Path(out) / "data").glob("*.parquet")))
    table = items_from_samples(samples, "synthetic")
    assert validate_items(table) == []
    row = table.to_pylist()[0]
    assert row["question"] == "What colour is the square?" and row["benchmark"] == "synthetic"
    assert row["prompt"].startswith("a ((") and row["image"]["bytes"]


# ---------------------------------------------------------------------------------------
# Overlap with the training data
# ---------------------------------------------------------------------------------------

TRAINING = [
    (
        "t-red-car",
        "color",
        "a ((red)) vintage car parked on a city street, realistic photo, 8k",
        ["red"],
    ),
    ("t-teal", "color", "a ((teal)) umbrella on a rainy beach, film grain", ["teal"]),
    (
        "t-crimson",
        "color",
        "a ((crimson)) sports car racing through a desert canyon at noon, dust clouds, "
        "wide angle lens, dramatic sky, highly detailed",
        ["crimson"],
    ),
    (
        "t-dog",
        "animal",
        "a ((golden retriever)) running on the beach at sunset",
        ["golden retriever"],
    ),
    ("t-shirt", "clothes", "a man wearing a ((t-shirt)) in a sunny park, candid photo", []),
]


def training_rows(extra: int = 0) -> list[dict]:
    rows = [{"id": i, "ability": a, "prompt": p, "keywords": k} for i, a, p, k in TRAINING]
    for n in range(extra):  # filler: other keywords, other scenes
        rows.append(
            {
                "id": f"fill-{n}",
                "ability": "color",
                "prompt": f"a ((shade{n})) teapot number {n} on shelf {n}, watercolor",
                "keywords": [f"shade{n}"],
            }
        )
    return rows


def item(iid: str, ability: str, prompt: str, keywords=("x",)) -> dict:
    return {"id": iid, "ability": ability, "prompt": prompt, "answer_keywords": list(keywords)}


def test_overlap_filter_drops_planted_overlaps_and_keeps_the_rest():
    items = [
        # Planted: same keyword (a plural), the rest of the prompt nearly the same.
        item(
            "same-kw-same-scene", "color", "((reds)) vintage car parked on the city street, photo"
        ),
        # Planted: another keyword, but the prompt repeats a training prompt nearly.
        item(
            "near-dup",
            "color",
            "a ((scarlet)) sports car racing through a desert canyon at noon, dust clouds, "
            "wide angle lens, dramatic sky, highly detailed",
        ),
        # Planted: no emphasis; the answer keyword is the keyword.
        item("answer-kw", "color", "red vintage car parked on a city street", keywords=["red"]),
        # Planted: a compound written otherwise (t shirt / t-shirt), same scene.
        item("compound", "clothes", "a man wearing a ((t shirt)) in a sunny park, candid photo"),
        # Kept: same keyword, another scene.
        item(
            "same-kw-other-scene",
            "color",
            "a ((red)) apple on a wooden kitchen table, morning light",
        ),
        # Kept: the same prompt as a training row of another ability.
        item("other-ability", "vehicle", TRAINING[0][2]),
        # Kept: unrelated, and a real image without a prompt.
        item("unrelated", "color", "a ((navy)) sailboat on a calm lake, oil painting"),
        item("no-prompt", "color", ""),
    ]
    kept, dropped = overlap_filter(items, training_rows(extra=50))
    assert [k["id"] for k in kept] == [
        "same-kw-other-scene",
        "other-ability",
        "unrelated",
        "no-prompt",
    ]
    assert kept[0] is not items[4] and kept[0] == items[4]  # carried through as given
    got = {d["id"]: d for d in dropped}
    assert {i: (d["reason"], json.loads(d["raw"])["overlaps"]) for i, d in got.items()} == {
        "same-kw-same-scene": ("keyword_overlap", "t-red-car"),
        "near-dup": ("near_duplicate_prompt", "t-crimson"),
        "answer-kw": ("keyword_overlap", "t-red-car"),
        "compound": ("keyword_overlap", "t-shirt"),
    }
    assert all(set(d) == set(REJECT_COLUMNS) and d["stage"] == "overlap" for d in dropped)
    raw = json.loads(got["same-kw-same-scene"]["raw"])
    assert raw["keyword"] == "reds" and raw["training_keyword"] == "red"
    assert raw["jaccard"] >= 0.5 and raw["training_prompt"] == TRAINING[0][2]
    assert json.loads(got["near-dup"]["raw"])["jaccard"] >= 0.8
    assert json.loads(got["answer-kw"]["raw"])["keyword"] == "red"

    # Thresholds decide: at 0.95 the paraphrased scene is kept, the exact one is not.
    kept, dropped = overlap_filter(items[:1], training_rows(), threshold=0.95)
    assert [k["id"] for k in kept] == ["same-kw-same-scene"]
    kept, dropped = overlap_filter(
        [
            item(
                "exact",
                "color",
                "a (red:1.3) vintage car parked on a city street, realistic photo, 8k",
            )
        ],
        training_rows(),
        threshold=1.0,
        near_duplicate_threshold=1.0,
    )
    assert [d["reason"] for d in dropped] == ["near_duplicate_prompt"]  # exact repeat
    with pytest.raises(ValueError, match="threshold must be in"):
        overlap_filter(items, training_rows(), threshold=0)


def test_overlap_filter_compares_only_rows_that_share_a_keyword(monkeypatch):
    calls = []
    real = bm._same_keyword.__wrapped__

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(bm, "_same_keyword", counting)
    items = [item(f"i{n}", "color", f"a ((red)) kite number {n} over a field") for n in range(20)]
    kept, dropped = overlap_filter(items, training_rows(extra=2000))
    assert len(kept) == 20 and dropped == []
    # Only the one training row filed under "red" is ever looked at.
    assert {b for _, b in calls} == {"red"}


def test_read_training_prompts_from_a_run(tmp_path):
    out = write_fixture_run(str(tmp_path / "run"), 12, rows_per_part=5)
    rows = read_training_prompts(out)
    assert rows.column_names == ["id", "ability", "prompt", "keywords"]
    assert rows.num_rows == 12
    assert read_training_prompts(str(Path(out) / "data")).equals(rows)
    assert read_training_prompts([out, out]).num_rows == 24
    data = pq.read_table(Path(out) / "data", columns=["id", "prompt"]).to_pylist()
    assert sorted(rows.column("id").to_pylist()) == sorted(r["id"] for r in data)

    # The fixture prompts are "a ((colour)) square, flat colour": an item repeating one is
    # dropped, naming the first training row of that colour.
    first = rows.to_pylist()[0]
    colour = first["keywords"][0]
    kept, dropped = overlap_filter(
        [
            item("copy", "color", f"a (({colour})) square, flat colour"),
            item("fresh", "color", f"a (({colour})) balloon above a fairground at night"),
        ],
        rows,
    )
    assert [k["id"] for k in kept] == ["fresh"]
    assert dropped[0]["reason"] == "keyword_overlap"
    assert json.loads(dropped[0]["raw"])["overlaps"] == first["id"]

    with pytest.raises(ConfigError, match="no .parquet files"):
        read_training_prompts(str(tmp_path / "empty"))
