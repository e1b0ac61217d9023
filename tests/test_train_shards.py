"""Sharded, deterministic reading (raypipe/train/shards.py), in-process: orders, slices,
the bytes each worker reads, and what a resume reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fixture_data import write_fixture_run

from raypipe.train.shards import (
    ShardReader,
    build_index,
    epoch_image_bytes,
    epoch_order,
    rank_rows,
    rows_per_epoch,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # 256 rows as a generation run writes them: 16 parts (row groups) of 16 rows.
    out = tmp_path_factory.mktemp("shards") / "out"
    write_fixture_run(str(out), 256, image_size=16, rows_per_part=16)
    return out


@pytest.fixture(scope="module")
def index(run_dir):
    return build_index([str(run_dir)])


def reader(index, rank, world, G=8, window=4096, num_samples=None):
    return ShardReader(
        index,
        seed=0,
        window_rows=window,
        num_samples=num_samples,
        global_batch=G,
        world=world,
        rank=rank,
    )


def ids_of(index, rows) -> list[str]:
    return [index.rows.column("id")[int(i)].as_py() for i in rows]


def test_each_epoch_has_its_own_order_and_reruns_repeat_it(index):
    e0 = epoch_order(index, 0, 0, 4096, 8).rows
    e1 = epoch_order(index, 0, 1, 4096, 8).rows
    assert sorted(e0) == sorted(e1) == list(range(256))  # every row once per epoch
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e1, epoch_order(index, 0, 1, 4096, 8).rows)
    assert not np.array_equal(e0, epoch_order(index, 1, 0, 4096, 8).rows)  # seed


def test_steps_hold_the_same_rows_for_any_worker_count(index):
    order = epoch_order(index, 0, 0, 64, 8)
    for step in range(256 // 8):
        one = set(rank_rows(order, step, 8, 1, 0))
        for world in (2, 4, 8):
            parts = [set(rank_rows(order, step, 8, world, r)) for r in range(world)]
            assert set().union(*parts) == one and sum(map(len, parts)) == 8


@pytest.mark.parametrize("world", [2, 4])
def test_each_worker_reads_about_its_share_of_the_image_bytes(index, world):
    total = epoch_image_bytes(index)
    steps = math.ceil(rows_per_epoch(index, 0, None) / 8)
    seen = []
    for rank in range(world):
        r = reader(index, rank, world)
        seen += [row["id"] for step in r.steps(0, steps, steps) for row in step]
        assert r.image_bytes <= (1 / world + 0.1) * total, (rank, r.image_bytes / total)
    assert sorted(seen) == sorted(index.rows.column("id").to_pylist())  # nothing lost


def test_rows_come_with_their_images_and_dialogues(index):
    r = reader(index, 0, 1)
    row = next(iter(r.steps(0, 1, 32)))[0]
    assert row["image"][:4] == b"\x89PNG" and row["image_error"] is None
    assert row["conversations"][0]["from"] == "human"


def test_a_resume_reads_no_image_only_earlier_steps_needed(index):
    # G=4 over one window of 256 rows: 4 strata of 64 rows (4 row groups each), consumed
    # front to back: step 32 starts the third group of every stratum.
    G, steps, s = 4, 64, 32
    full = reader(index, 0, 2, G=G)
    before = {
        row["id"] for k, step in enumerate(full.steps(0, steps, steps)) for row in step if k < s
    }
    resumed = reader(index, 0, 2, G=G)
    after = [row["id"] for step in resumed.steps(s, steps, steps) for row in step]
    read = {
        i
        for key in resumed.groups_read
        for i in ids_of(index, np.flatnonzero(_group_mask(index, key)))
    }
    assert read and not read & before  # not one image of steps before s was read
    assert set(after) <= read
    assert resumed.image_bytes == pytest.approx(full.image_bytes / 2, rel=0.01)


def _group_mask(index, key):
    s, f, g = key
    rows = index.rows
    return (
        (rows.column("source").to_numpy() == s)
        & (rows.column("file").to_numpy() == f)
        & (rows.column("group").to_numpy() == g)
    )


def test_num_samples_and_weights_shape_the_epoch(run_dir):
    index = build_index([f"{run_dir}@0.5"])
    n = rows_per_epoch(index, 0, None)
    assert 90 < n < 166  # a seeded half
    assert rows_per_epoch(index, 0, 40) == 40
    assert len(epoch_order(index, 0, 0, 4096, 8, num_samples=40).rows) == 40
    twice = build_index([f"{run_dir}@2"])
    assert rows_per_epoch(twice, 0, None) == 512


def test_temporary_files_beside_the_data_change_nothing(run_dir, index, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run_dir, copy)
    parts = sorted((copy / "data").glob("part-*.parquet"))
    (copy / "data" / ".tmp-complete.parquet").write_bytes(parts[0].read_bytes())
    (copy / "data" / ".tmp-truncated.parquet").write_bytes(parts[1].read_bytes()[:100])
    (copy / "data" / "_SUCCESS").write_bytes(b"")
    again = build_index([str(copy)])
    assert again.rows.column("id").to_pylist() == index.rows.column("id").to_pylist()
    r = reader(again, 0, 1)
    assert sum(len(step) for step in r.steps(0, 32, 32)) == 256
