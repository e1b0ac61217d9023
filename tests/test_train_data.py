"""Training data: sources, mixing, encoding, drop accounting and collation (tiny models, CPU)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixture_data import (
    write_fixture_llava_json,
    write_fixture_parquet,
    write_fixture_stablellava_json,
)
from PIL import Image

from raypipe.errors import ConfigError
from raypipe.train.conversation import (
    DROP_NO_IMAGE_TOKEN,
    DROP_NOTHING_TO_SUPERVISE,
    IGNORE_INDEX,
    render_conversation,
)
from raypipe.train.encoding import SampleEncoder, collate
from raypipe.train.reading import TRAIN_ROW_SCHEMA, build_train_dataset
from raypipe.train.sources import (
    DROP_MISSING_FILE,
    DROP_NO_IMAGE,
    DROP_UNDECODABLE,
    DataSource,
    check_sources,
    parse_source,
)

TINY_LLAVA = "raypipe-tiny/tiny-llava"
TURNS = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "It is a red square."},
]


def png(colour, width=32, height=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def row(row_id="r", image=None, turns=TURNS, image_error=None):
    return {
        "id": row_id,
        "source": "test",
        "image": png("red") if image is None else image,
        "image_error": image_error,
        "conversations": turns,
    }


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return SampleEncoder(TINY_LLAVA, "vicuna_v1", max_length=128, pad_to_square=True)


# -- sources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("out/demo/data", DataSource("out/demo/data")),
        ("llava.json:images_dir", DataSource("llava.json", image_folder="images_dir")),
        ("x.json:imgs@0.3", DataSource("x.json", image_folder="imgs", weight=0.3)),
        ("out/demo@2", DataSource("out/demo", weight=2.0)),
        ("s3://b/run/data", DataSource("s3://b/run/data")),
        (
            "s3://b/l.json?endpoint_override=h:9000&scheme=http:s3://b/img?endpoint_override=h:9000@2",
            DataSource(
                "s3://b/l.json?endpoint_override=h:9000&scheme=http",
                image_folder="s3://b/img?endpoint_override=h:9000",
                weight=2.0,
            ),
        ),
    ],
)
def test_parse_source(spec, expected):
    assert parse_source(spec) == expected


def test_check_sources_detects_each_format(tmp_path):
    run = tmp_path / "run"
    write_fixture_parquet(run / "data", 3)
    (run / "manifest.json").write_text("{}")
    llava = write_fixture_llava_json(tmp_path / "llava", 2)
    stable = write_fixture_stablellava_json(tmp_path / "stable", 2)
    resolved = check_sources(
        [str(run), str(run / "data" / "part-00000.parquet"), str(llava), f"{stable}@0.5"]
    )
    assert [s.kind for s in resolved] == ["raypipe", "raypipe", "llava_json", "stablellava"]
    assert resolved[2].image_folder == str(llava.parent)
    assert resolved[3].weight == 0.5


def test_check_sources_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--data PATH"):
        check_sources([])
    with pytest.raises(ConfigError, match="does not exist"):
        check_sources([str(tmp_path / "nowhere")])
    (tmp_path / "empty.json").write_text(" [ ]\n")
    with pytest.raises(ConfigError, match="empty list"):
        check_sources([str(tmp_path / "empty.json")])
    (tmp_path / "odd.json").write_text(json.dumps([{"text": "hello"}]))
    with pytest.raises(ConfigError, match="unknown record format"):
        check_sources([str(tmp_path / "odd.json")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="unknown format"):
        check_sources([str(tmp_path / "notes.txt")])
    (tmp_path / "no_parquet").mkdir()
    with pytest.raises(ConfigError, match="no .parquet files"):
        check_sources([str(tmp_path / "no_parquet")])
    write_fixture_parquet(tmp_path / "zero", 0)
    with pytest.raises(ConfigError, match="no rows"):
        check_sources([str(tmp_path / "zero")])
    llava = write_fixture_llava_json(tmp_path / "llava", 1)
    with pytest.raises(ConfigError, match="image folder"):
        check_sources([f"{llava}:{tmp_path / 'no_images'}"])
    with pytest.raises(ConfigError, match="weight"):
        check_sources([DataSource(str(llava), weight=0.0)])
    pq.write_table(
        pq.read_table(next((tmp_path / "zero").glob("*.parquet"))).drop(["image"]),
        tmp_path / "other.parquet",
    )
    with pytest.raises(ConfigError, match="lacks columns"):
        check_sources([str(tmp_path / "other.parquet")])


# -- encoding -----------------------------------------------------------------------------


def test_encoder_matches_renderer_and_flags_bad_rows(encoder):
    tok = encoder.processor.tokenizer
    at_end = [{"from": "human", "value": "What colour is the square?\n<image>"}, TURNS[1]]
    long_turns = [{"from": "human", "value": "<image>\n" + "describe the image " * 40}, TURNS[1]]
    rows = [
        row("ok"),
        row("at-end", turns=at_end),
        row("undecodable", image=b"not an image"),
        row("truncated-png", image=png("red")[:60]),
        row("missing", image=b"", image_error=f"{DROP_MISSING_FILE}: /x.png (No such file)"),
        row("no-image", image=b"", image_error=DROP_NO_IMAGE),
        row("no-token", turns=[{"from": "human", "value": "What colour?"}, TURNS[1]]),
        row("too-long", turns=long_turns),
    ]
    out = encoder(rows)
    reasons = dict(zip(out["id"], out["drop_reason"]))
    assert reasons == {
        "ok": "",
        "at-end": "",
        "undecodable": DROP_UNDECODABLE,
        "truncated-png": DROP_UNDECODABLE,
        "missing": DROP_MISSING_FILE,
        "no-image": DROP_NO_IMAGE,
        "no-token": DROP_NO_IMAGE_TOKEN,
        "too-long": DROP_NOTHING_TO_SUPERVISE,
    }
    expected = render_conversation(TURNS, tok, "vicuna_v1", 16)
    for i in (0, 1):  # <image> at the end of the turn moves to the front, as in LLaVA
        assert out["input_ids"][i].tolist() == expected.input_ids
        assert out["labels"][i].tolist() == expected.labels
        assert out["input_ids"][i].dtype == np.int32
    assert out["pixel_values"].shape == (8, 3, 32, 32)
    assert out["pixel_values"].dtype == np.float32
    reasons = Counter(str(r) for r in out["drop_reason"])
    assert reasons.pop("") == 2
    assert reasons == {
        DROP_NOTHING_TO_SUPERVISE: 1,
        DROP_MISSING_FILE: 1,
        DROP_NO_IMAGE_TOKEN: 1,
        DROP_NO_IMAGE: 1,
        DROP_UNDECODABLE: 2,
    }


def test_pad_to_square_pads_with_the_mean_colour(encoder, tiny_dir):
    """A wide red image: padded, the top rows are the (normalised) mean colour, ~0;
    center-cropped, every pixel is red."""
    wide = row("wide", image=png((255, 0, 0), width=64, height=32))
    padded = encoder([wide])["pixel_values"][0]
    cropped = SampleEncoder(TINY_LLAVA, "vicuna_v1", 128, pad_to_square=False)([wide])
    cropped = cropped["pixel_values"][0]
    mean = np.array(encoder.processor.image_processor.image_mean)
    std = np.array(encoder.processor.image_processor.image_std)
    red = (np.array([1.0, 0.0, 0.0]) - mean) / std
    assert np.allclose(padded[:, :4, :].mean(axis=(1, 2)), 0.0, atol=0.02)  # mean colour band
    assert np.allclose(padded[:, 16, :].mean(axis=1), red, atol=0.05)  # the image itself
    assert np.allclose(cropped.mean(axis=(1, 2)), red, atol=0.05)


def test_chat_template_encoder(tiny_dir):
    encoder = SampleEncoder(TINY_LLAVA, "chat_template", 128, pad_to_square=False)
    out = encoder([row("ok")])
    tok = encoder.processor.tokenizer
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(encoder.processor.image_token_id) == 16
    supervised = [t for t, lbl in zip(ids, labels) if lbl != IGNORE_INDEX]
    assert tok.decode(supervised).strip() == "It is a red square.</s>"


# -- collation ----------------------------------------------------------------------------


def test_collate_pads_ids_labels_and_mask(encoder):
    short = row("short")
    long = row(
        "long",
        turns=TURNS
        + [{"from": "human", "value": "Is it blue?"}, {"from": "gpt", "value": "No, it is red."}],
    )
    out = encoder([short, long])
    n_short, n_long = len(out["input_ids"][0]), len(out["input_ids"][1])
    assert n_long > n_short
    for rows in (out, [{k: out[k][i] for k in out} for i in range(2)]):
        batch = collate(rows, pad_token_id=7)
        assert batch["input_ids"].shape == batch["labels"].shape == (2, n_long)
        assert batch["input_ids"].dtype == torch.long
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        assert batch["input_ids"][0, n_short:].eq(7).all()
        assert batch["labels"][0, n_short:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"].sum(dim=1).tolist() == [n_short, n_long]
        assert batch["input_ids"][1].tolist() == out["input_ids"][1].tolist()
        assert batch["labels"][0, :n_short].tolist() == out["labels"][0].tolist()
    padded = collate(out, 0, pad_to_multiple_of=n_long + 3)
    assert padded["input_ids"].shape == padded["labels"].shape == (2, n_long + 3)
    # Equal lengths: Ray hands them over as one 2-D array instead of an object array.
    two_d = {
        k: (np.stack(v) if k in ("input_ids", "labels") else v)
        for k, v in encoder([short, short]).items()
    }
    assert collate(two_d, 0)["input_ids"].shape == (2, n_short)
    with pytest.raises(ValueError, match="dropped rows"):
        collate(encoder([row("bad", image=b"x")]), 0)


# -- Ray Data -----------------------------------------------------------------------------


def test_all_formats_read_encode_and_count_corrupt_rows(ray_local, tiny_dir, tmp_path):
    parquet = write_fixture_parquet(tmp_path / "run" / "data", 6, seed=1)
    llava = write_fixture_llava_json(tmp_path / "llava", 4, corrupt=True)
    stable = write_fixture_stablellava_json(tmp_path / "stable", 4, corrupt=True)
    sources = [str(parquet.parent), str(llava), str(stable)]
    ds = build_train_dataset(sources, seed=0)
    assert ds.schema().names == TRAIN_ROW_SCHEMA.names
    streamed = ds.take_all()
    # Both readers (Ray Data's stream, and the sharded reader) yield the same rows.
    from raypipe.train.shards import ShardReader, build_index

    index = build_index(sources)
    shard = ShardReader(
        index, seed=0, window_rows=64, num_samples=None, global_batch=1, world=1, rank=0
    )
    sharded = [r for step in shard.steps(0, 23, 23) for r in step]
    key = lambda r: (r["source"], r["id"])  # noqa: E731
    assert sorted(map(key, sharded)) == sorted(map(key, streamed))
    for rows in (streamed, sharded):
        out = SampleEncoder(TINY_LLAVA, "vicuna_v1", 128, pad_to_square=True)(rows)
        reasons = Counter(str(r) for r in out["drop_reason"])
        assert len(rows) == 6 + 4 + 3 + 4 + 2
        assert reasons.pop("") == 14
        assert reasons == {DROP_MISSING_FILE: 2, DROP_NO_IMAGE_TOKEN: 1, DROP_UNDECODABLE: 2}
    missing = [r for r, why in zip(out["id"], out["drop_reason"]) if why == DROP_MISSING_FILE]
    assert "llava-missing" in " ".join(missing)
    kept = [
        {k: out[k][i] for k in ("id", "source", "input_ids", "labels", "pixel_values")}
        for i, why in enumerate(out["drop_reason"])
        if not why
    ]
    by_source = Counter(r["source"] for r in kept)
    assert by_source == {str(parquet.parent): 6, str(llava): 4, str(stable): 4}
    ids = {r["id"] for r in kept}
    assert {"llava-00001", "stablellava-00000", "color-s1-0000005"} <= ids
    batch = collate(kept[:4], pad_token_id=0)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()


def test_mixing_weights_and_deterministic_order(ray_local, tmp_path):
    a = write_fixture_llava_json(tmp_path / "a", 40)
    b = write_fixture_stablellava_json(tmp_path / "b", 30)
    sources = [f"{a}@0.5", f"{b}@2"]

    def ids(**kw):
        ds = build_train_dataset(sources, **kw)
        return [(r["source"], r["id"]) for r in ds.select_columns(["source", "id"]).take_all()]

    first = ids(seed=0)
    counts = Counter(source for source, _ in first)
    assert counts[str(b)] == 60  # whole weights are exact
    assert 12 <= counts[str(a)] <= 28  # 0.5 of 40, by a per-row hash
    assert len({i for s, i in first if s == str(b)}) == 30
    assert ids(seed=0) == first  # same seed, same rows in the same order
    other = ids(seed=1)
    assert other != first and Counter(s for s, _ in other)[str(b)] == 60
    assert ids(seed=0, num_samples=25) == first[:25]
    unshuffled = ids(seed=0, shuffle=False)
    assert sorted(unshuffled) == sorted(first)
    assert [s for s, _ in unshuffled] == sorted(s for s, _ in unshuffled)  # a's rows, then b's
