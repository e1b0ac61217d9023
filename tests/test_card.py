"""The dataset card (OUT/README.md) and contact sheet (OUT/preview.png). No Ray, no models."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fixture_data import write_fixture_parquet

from raypipe.generate import card
from raypipe.generate.card import preview_size, size_category, write_card
from raypipe.generate.store import OutputStore
from raypipe.schema import REJECT_SCHEMA, SAMPLE_SCHEMA

ABILITIES = ("color", "animal", "plant")
N = 30  # 10 per ability; 8 rows per part -> 4 parts


def _make_out(tmp_path):
    """OUT with data parts over three abilities, a rejects part and a temporary junk part."""
    src = write_fixture_parquet(tmp_path / "src", N, rows_per_file=8)
    out = tmp_path / "OUT"
    (out / "data").mkdir(parents=True)
    (out / "rejects").mkdir()
    for path in sorted(src.glob("*.parquet")):
        t = pq.read_table(path)
        offset = int(path.stem.split("-")[1]) * 8
        names = [ABILITIES[(offset + i) % len(ABILITIES)] for i in range(t.num_rows)]
        t = t.set_column(t.schema.get_field_index("ability"), "ability", pa.array(names))
        pq.write_table(t.cast(SAMPLE_SCHEMA), out / "data" / path.name, row_group_size=4)
    # A half-written part of an interrupted job: must be ignored by every reader.
    junk = pq.read_table(out / "data" / "part-00000.parquet")
    pq.write_table(junk, out / "data" / ".tmp-0123abcd-part-00009.parquet")
    rejects = pa.Table.from_pylist(
        [
            {
                "id": "color-s0-0000100",
                "ability": "color",
                "stage": "quality",
                "reason": "blank_image",
                "raw": "",
            },
            {
                "id": "animal-s0-0000100",
                "ability": "animal",
                "stage": "dialogue",
                "reason": "no|pipe",
                "raw": "x",
            },
        ],
        schema=REJECT_SCHEMA,
    )
    pq.write_table(rejects, out / "rejects" / "part-r.parquet")
    return out


def _manifest(out) -> dict:
    per = {
        n: {"quota": 10, "accepted": 10, "rejected": 1 if n != "plant" else 0, "keywords": 40}
        for n in ABILITIES
    }
    return {
        "out": str(out),
        "models": {"sd": "stable-diffusion-v1-5/stable-diffusion-v1-5", "llm": "gpt-4o-mini"},
        "num_samples": N,
        "config": {
            "seed": 0,
            "num_samples": N,
            "abilities": list(ABILITIES),
            "prompts_per_request": 5,
            "llm": {"backend": "openai", "model": "gpt-4o-mini", "temperature": 0.9},
            "render": {
                "model": "sd15",
                "width": 512,
                "height": 512,
                "steps": 30,
                "guidance_scale": 7.5,
            },
            "quality": {"clip_model": None},
        },
        "counts": {
            "accepted": N,
            "rejected": 2,
            "balanced": True,
            "abilities": per,
            "reject_reasons": {"quality:blank_image": 1, "dialogue:no|pipe": 1},
        },
        "llm": {"prompt_tokens": 1234, "completion_tokens": 567, "cost_usd": 0.0012},
        "versions": {"raypipe": "0.1.0"},
    }


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.fixture
def out(tmp_path):
    out = _make_out(tmp_path)
    write_card(OutputStore(str(out)), _manifest(out))
    return out


def test_load_dataset_reads_only_data_rows_with_image_feature(out, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == N  # not the rejects, not the .tmp part
    assert isinstance(ds.features["image"], datasets.Image)
    assert set(ds.column_names) == set(SAMPLE_SCHEMA.names)
    want = OutputStore(str(out)).read_columns("data", ["id"]).column("id").to_pylist()
    assert sorted(ds["id"]) == sorted(want) and len(set(want)) == N
    row = ds[0]
    assert row["image"].size == (32, 32)
    assert row["conversations"][0]["from"] == "human"


def test_card_front_matter(out):
    meta = _front_matter((out / "README.md").read_text())
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}
    ]
    assert "license" in meta and meta["license"] is None  # left for the user
    assert meta["size_categories"] == ["n<1K"]
    assert "visual-question-answering" in meta["task_categories"]
    features = {f["name"]: f for f in meta["dataset_info"]["features"]}
    assert list(features) == SAMPLE_SCHEMA.names
    assert features["image"] == {"name": "image", "dtype": "image"}
    assert features["keywords"] == {"name": "keywords", "list": "string"}
    assert features["seed"]["dtype"] == "int64" and features["width"]["dtype"] == "int32"
    assert features["conversations"]["list"] == [
        {"name": "from", "dtype": "string"},
        {"name": "value", "dtype": "string"},
    ]


def test_card_features_match_what_datasets_infers():
    datasets = pytest.importorskip("datasets")
    from raypipe.generate.card import _feature

    ours = datasets.Features._from_yaml_list([_feature(f) for f in SAMPLE_SCHEMA])
    assert ours == datasets.Features.from_arrow_schema(SAMPLE_SCHEMA)


def test_card_body(out):
    text = (out / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    assert "StableLLaVA" in body and "raypipe" in body
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in body and "gpt-4o-mini" in body
    assert "| animal | 10 | 10 | 1 | 40 |" in body
    assert "| dialogue:no\\|pipe | 1 |" in body  # a pipe in a reason does not break the table
    assert f'load_dataset("{out}", split="train")' in body
    assert "![A few rows per ability](preview.png)" in body
    assert "license:" in text.split("\n---\n", 1)[0]


def test_preview_grid(out):
    from PIL import Image

    with Image.open(out / "preview.png") as img:
        assert img.format == "PNG"
        assert img.size == preview_size(len(ABILITIES), card.PER_ABILITY)
        # The first thumbnail holds a fixture image (a flat colour), not the background.
        x = y = card.PREVIEW_PAD + card.PREVIEW_THUMB // 2
        assert img.convert("RGB").getpixel((x, y)) != (255, 255, 255)


def test_preview_reads_images_only_of_needed_row_groups(tmp_path, monkeypatch):
    out = _make_out(tmp_path)
    calls = []
    real = card._read_group

    def spy(pf, group, columns):
        calls.append(tuple(columns))
        return real(pf, group, columns)

    monkeypatch.setattr(card, "_read_group", spy)
    picked = card._pick_preview_rows(OutputStore(str(out)), _manifest(out), per_ability=2)
    assert {n: len(v) for n, v in picked.items()} == {n: 2 for n in ABILITIES}
    # Rows 0-3 (first row group) hold 2 color, 1 animal, 1 plant; rows 4-7 finish them.
    # The other 6 row groups (3 parts) are never opened.
    image_reads = [c for c in calls if "image" in c]
    assert len(image_reads) == 2
    assert len(calls) == 4


def test_no_preview_without_rows(tmp_path):
    out = tmp_path / "OUT"
    manifest = _manifest(out)
    manifest["counts"].update(accepted=0, abilities={}, reject_reasons={})
    write_card(OutputStore(str(out)), manifest)
    assert not (out / "preview.png").exists()
    text = (out / "README.md").read_text()
    assert "preview.png" not in text and "No row was rejected." in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize(
    "n,tag",
    [
        (0, "n<1K"),
        (999, "n<1K"),
        (1000, "1K<n<10K"),
        (10_000, "10K<n<100K"),
        (2_500_000, "1M<n<10M"),
    ],
)
def test_size_category(n, tag):
    assert size_category(n) == tag
