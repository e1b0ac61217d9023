"""Resumes that are exact or refused, checkpoints that load no code, complete-or-skipped
checkpoints, image paths confined to their dataset, and lineage that says what trained.

Unit tests build their checkpoints and indexes in-process; the Ray Train tests share one
2-worker run of 4 steps (``four_steps``: a checkpoint every 2) and each work on a copy.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixture_data import write_fixture_run

from raypipe.config import redacted
from raypipe.errors import ConfigError
from raypipe.lease import LEASE_FILE
from raypipe.train.checkpoint import latest_checkpoint
from raypipe.train.config import load_train_config
from raypipe.train.dcp_reader import UnsafeCheckpointError, safe_load
from raypipe.train.plan import (
    check_resumable,
    generation_lease,
    plan_changes,
    plan_fingerprint,
)
from raypipe.train.shards import build_index
from raypipe.train.sources import DROP_OUTSIDE, DataSource, image_location, json_records


def _cfg(*over: str):
    return load_train_config("raypipe/configs/train/tiny.yaml", list(over))


def _add_part(data: Path) -> str:
    """A new Parquet part in ``data`` (rows of the first part under new ids); its name."""
    table = pq.read_table(sorted(data.glob("*.parquet"))[0])
    ids = [f"{i}-added" for i in table.column("id").to_pylist()]
    table = table.set_column(table.schema.get_field_index("id"), "id", [ids])
    pq.write_table(table, data / "part-added.parquet")
    return "part-added.parquet"


# ---------------------------------------------------------------------------------------
# 1. The plan's fingerprint
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("data")
    write_fixture_run(str(out), 16, seed=4, rows_per_part=4)
    return out / "data"


def test_fingerprint_names_each_change_of_the_plan(data_dir, tmp_path):
    fp = plan_fingerprint(_cfg(), build_index([str(data_dir)]))
    assert plan_changes(fp, plan_fingerprint(_cfg(), build_index([str(data_dir)]))) == []
    assert plan_changes(fp, plan_fingerprint(_cfg("seed=1"), build_index([str(data_dir)]))) == [
        "seed: 0 -> 1"
    ]
    window = plan_fingerprint(_cfg("data.shuffle_window_rows=16"), build_index([str(data_dir)]))
    assert plan_changes(fp, window) == ["data.shuffle_window_rows: 2048 -> 16"]
    weighted = plan_fingerprint(_cfg(), build_index([f"{data_dir}@2"]))
    assert plan_changes(fp, weighted) == [f"data: {data_dir}: weight 1.0 -> 2.0"]
    batch = plan_fingerprint(_cfg("global_batch_size=4"), build_index([str(data_dir)]))
    assert plan_changes(fp, batch) == ["global_batch_size: 8 -> 4"]
    # Data grown by a part: named, whatever the step count does.
    grown = tmp_path / "data"
    shutil.copytree(data_dir, grown)
    fp_grown = plan_fingerprint(_cfg(), build_index([str(grown)]))
    name = _add_part(grown)
    changes = plan_changes(fp_grown, plan_fingerprint(_cfg(), build_index([str(grown)])))
    assert changes == [f"data: {grown}: files added: {name}"]


def test_a_checkpoint_of_another_plan_is_refused_unless_new_plan(data_dir, tmp_path):
    step = tmp_path / "step_00000004"
    step.mkdir()
    fp = plan_fingerprint(_cfg(), build_index([str(data_dir)]))
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "plan": fp}))
    assert check_resumable(str(step), fp, new_plan=False) == []
    other = plan_fingerprint(_cfg("seed=7"), build_index([str(data_dir)]))
    with pytest.raises(ConfigError, match=r"another plan(.|\n)*seed: 0 -> 7(.|\n)*--new-plan"):
        check_resumable(str(step), other, new_plan=False)
    assert check_resumable(str(step), other, new_plan=True) == ["seed: 0 -> 7"]
    (step / "trainer_state.json").write_text(json.dumps({"step": 4}))  # an older raypipe's
    with pytest.raises(ConfigError, match="records no plan"):
        check_resumable(str(step), fp, new_plan=False)


def test_setup_refuses_a_grown_dataset_before_any_worker(data_dir, tmp_path):
    from raypipe.train.trainer import preflight, setup

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    cfg, sources = preflight(_cfg(), [str(data)])
    run = _fake_run(tmp_path / "out", [2], name="tiny")  # OUT/<name>/step_*
    (run / "step_00000002" / "trainer_state.json").write_text(
        json.dumps(
            {"step": 2, "num_workers": 2, "plan": plan_fingerprint(cfg, build_index(sources))}
        )
    )
    added = _add_part(data)
    # Refused on the driver: no Ray is started (setup would ray.put the index after).
    with pytest.raises(ConfigError, match=f"another plan(.|\n)*files added: {added}"):
        setup(cfg, sources, tmp_path / "out")


def test_the_export_lineage_and_card_name_datasets_and_plans(data_dir):
    from raypipe.train.checkpoint import TrainerState
    from raypipe.train.export import dataset_lineage, lineage_record, model_card
    from raypipe.train.plan import RunPlan
    from raypipe.train.worker import export_lineage

    cfg = _cfg()
    plan = RunPlan(
        train=cfg.model_dump(mode="json"),
        run_dir="r",
        export_dir="e",
        num_rows=16,
        steps_per_epoch=2,
        total_steps=2,
        fingerprint={},
        lineage=dataset_lineage([str(data_dir)]),
    )
    change = {
        "from_step": 4,
        "new_plan": True,
        "checkpoint": "r/step_4",
        "changes": ["seed: 0 -> 1"],
    }
    state = TrainerState(step=6, plans=[{"from_step": 0}, change])
    record = lineage_record(cfg, export_lineage(plan, state, 6))
    assert record["plans"][1] == change
    assert record["config"]["model"]["image_token"] == "<image>"
    sha = record["datasets"][0]["manifest_sha256"]
    card = model_card(record)
    assert sha and f"`{data_dir}` (raypipe): manifest sha256 `{sha}`" in card
    assert "from step 4, a new plan (`--new-plan`)" in card and "seed: 0 -> 1" in card


def test_a_leased_generation_out_is_seen_in_any_lease_format(tmp_path, caplog):
    from raypipe.train.plan import warn_if_growing

    out = tmp_path / "gen"
    write_fixture_run(str(out), 4, rows_per_part=4)
    source = DataSource(path=str(out / "data"), kind="raypipe")
    assert generation_lease(str(out)) is None and warn_if_growing([source]) == []
    (out / LEASE_FILE).write_text(json.dumps({"host": "gen-node", "pid": 42}))
    lease = generation_lease(str(out))
    assert lease["host"] == "gen-node" and lease["age_s"] >= 0
    (out / LEASE_FILE).write_text("not json")  # whatever the lease holds, it counts
    with caplog.at_level(logging.WARNING):
        assert warn_if_growing([source]) == [str(out / "data")]
    assert "may still grow" in caplog.text and LEASE_FILE in caplog.text


# ---------------------------------------------------------------------------------------
# 2-3. Checkpoints that load no code; complete or skipped
# ---------------------------------------------------------------------------------------


class _Payload:
    """A pickle that writes ``marker`` when unpickled by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_checkpoint(folder: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    dcp.save(state, checkpoint_id=str(folder))
    return state


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    saved = _dcp_checkpoint(tmp_path / "ckpt")
    target = {"model": {k: torch.zeros_like(v) for k, v in saved["model"].items()}}
    safe_load(target, str(tmp_path / "ckpt"))  # a genuine checkpoint loads
    assert torch.equal(target["model"]["weight"], saved["model"]["weight"])
    # The payload is real: plain pickle would run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()
    marker = tmp_path / "marker"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        safe_load(target, str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_a_crafted_byte_item_is_refused_and_runs_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    # A non-tensor item (as the optimiser's param_groups are) whose pickle runs code.
    dcp.save({"lr": _Payload(marker), "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(UnsafeCheckpointError, match="(posix|os).system") as info:
        safe_load({"lr": 0.1, "w": torch.zeros(2)}, str(tmp_path / "c"))
    assert "not plain data" in str(info.value)
    assert not marker.exists()


def _fake_run(tmp_path: Path, steps: list[int], name: str = "run") -> Path:
    """Checkpoint folders as a 2-worker run writes them (real DCP files), per step."""
    run = tmp_path / name
    for step in steps:
        folder = run / f"step_{step:08d}"
        _dcp_checkpoint(folder)
        (folder / "__1_0.distcp").write_bytes(b"")  # as if rank 1 held no shard
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "num_workers": 2}))
        for rank in (0, 1):
            (folder / f"trainer_state_rank{rank}.pt").write_bytes(b"state")
    return run


@pytest.mark.parametrize("damage", ["deleted", "truncated", "metadata cut short"])
def test_an_incomplete_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    run = _fake_run(tmp_path, [2, 4])
    assert latest_checkpoint(run) == str(run / "step_00000004")
    shard = run / "step_00000004" / "__0_0.distcp"
    metadata = shard.parent / ".metadata"
    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        metadata.write_bytes(metadata.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(run) == str(run / "step_00000002")
    named = ".metadata" if damage.startswith("metadata") else "__0_0.distcp"
    assert f"skipping checkpoint {run / 'step_00000004'}: {named}" in caplog.text


def test_a_crafted_metadata_in_the_latest_checkpoint_stops_the_driver(tmp_path):
    run = _fake_run(tmp_path, [2, 4])
    marker = tmp_path / "marker"
    (run / "step_00000004" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError):
        latest_checkpoint(run)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# 4. Image paths stay in their dataset
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("images/a.png", "images/a.png"),
        ("./images/../images/a.png", "images/a.png"),
        ("../a.png", None),
        ("images/../../a.png", None),
        ("/etc/hostname", None),
        ("\\\\server\\share\\a.png", None),
        ("s3://other-bucket/a.png", None),
        ("file:///etc/hostname", None),
        ("C:\\images\\a.png", None),
        ("", None),
    ],
)
def test_image_location_stays_in_the_folder(path, inside):
    location, error = image_location("/data/llava", path)
    if inside is None:
        assert (location, error) == (None, DROP_OUTSIDE)
    else:
        assert (location, error) == (f"/data/llava/{inside}", None)


def test_uri_folders_keep_their_query_and_external_paths_need_the_switch():
    folder = "s3://b/imgs?endpoint_override=127.0.0.1:9000"
    assert image_location(folder, "x/a.png") == (
        "s3://b/imgs/x/a.png?endpoint_override=127.0.0.1:9000",
        None,
    )
    # A query in the path would replace the folder's endpoint: refused.
    assert image_location(folder, "a.png?endpoint_override=evil:1") == (None, DROP_OUTSIDE)
    assert image_location(folder, "../other/a.png", allow_external=True)[1] is None
    assert image_location("/d", "/abs/a.png", allow_external=True) == ("/abs/a.png", None)


def test_outside_rows_get_one_reason_whether_or_not_the_target_exists(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    folder = tmp_path / "set"
    folder.mkdir()
    records = [
        {"id": str(i), "image": image, "conversations": []}
        for i, image in enumerate(
            ["../secret.png", "../nothing.png", str(tmp_path / "secret.png"), "/no/such.png"]
        )
    ]
    (folder / "d.json").write_text(json.dumps(records))
    src = DataSource(str(folder / "d.json"), "llava_json", str(folder), checked=True)
    assert {(r.image_path, r.image_error) for r in json_records(src)} == {(None, DROP_OUTSIDE)}


def test_parquet_image_paths_stay_in_the_data_folder_in_both_readers(tmp_path):
    from fixture_data import write_fixture_parquet

    from raypipe.train.reading import _stage_parquet_batch
    from raypipe.train.shards import ShardReader
    from raypipe.train.sources import check_sources

    data = write_fixture_parquet(tmp_path / "data", 4, rows_per_file=4)
    image = pq.read_table(data / "part-00000.parquet").column("image")[0].as_py()["bytes"]
    (data / "img.png").write_bytes(image)
    (tmp_path / "outside.png").write_bytes(image)
    table = pq.read_table(data / "part-00000.parquet")
    paths = ["img.png", "../outside.png", str(tmp_path / "outside.png"), "../missing.png"]
    images = [{"bytes": None, "path": path} for path in paths]
    table = table.set_column(table.schema.get_field_index("image"), "image", [images])
    pq.write_table(table, data / "part-00000.parquet")
    (src,) = check_sources([str(data)])
    assert src.image_folder == str(data)

    index = build_index([src])
    reader = ShardReader(
        index, seed=0, window_rows=4, num_samples=None, global_batch=4, world=1, rank=0
    )
    rows = {r["id"]: r for r in next(reader.steps(0, 1, 1))}
    by_path = dict(zip(paths, table.column("id").to_pylist()))
    assert rows[by_path["img.png"]]["image"] == image  # inside: read
    for path in paths[1:]:  # outside, existing or not: one reason, nothing read
        assert (rows[by_path[path]]["image"], rows[by_path[path]]["image_error"]) == (
            None,
            DROP_OUTSIDE,
        )
    # The row group's own image column, and one file: the inside one.
    assert reader.image_bytes == sum(index.group_image_bytes.values()) + len(image)

    staged = _stage_parquet_batch(
        table, src.path, src.image_folder, False, index=0, weight=1.0, seed=0, epoch=0
    ).to_pylist()
    errors = {row["id"]: (row["image_path"], row["image_error"]) for row in staged}
    assert errors[by_path["img.png"]] == (str(data / "img.png"), None)
    assert {errors[by_path[p]] for p in paths[1:]} == {(None, DROP_OUTSIDE)}


# ---------------------------------------------------------------------------------------
# 5. Redaction by secret names and values
# ---------------------------------------------------------------------------------------


def test_redaction_keeps_image_token_and_hides_real_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789abcdefABCDEF")
    cfg = _cfg()
    out = redacted(
        {
            "config": cfg.model_dump(mode="json"),
            "llm": {"api_key": "plain-key", "api_key_env": "OPENAI_API_KEY", "max_tokens": 9},
            "aws_secret_access_key": "abc/def",
            "hf_token": "hf_abcdefghijklmnopqrstuvwx",
            "note": "called with sk-live-0123456789abcdefABCDEF",
            "pad_token": "<pad>",
        }
    )
    assert out["config"]["model"]["image_token"] == "<image>"
    assert out["pad_token"] == "<pad>" and out["llm"]["max_tokens"] == 9
    assert out["llm"]["api_key_env"] == "OPENAI_API_KEY"
    assert out["llm"]["api_key"] == out["aws_secret_access_key"] == out["hf_token"] == "***"
    assert out["note"] == "called with ***"


# ---------------------------------------------------------------------------------------
# On Ray Train: one 2-worker run of 4 steps, then resumes of copies of it
# ---------------------------------------------------------------------------------------


def _fit_cfg(**over):
    base = {
        "num_workers": 2,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "max_steps": 4,
        "checkpoint_every_steps": 2,
        "keep_checkpoints": 3,
        "report_every": 2,
        "max_failures": 0,
        "export": "false",
    }
    base.update(over)
    return _cfg(*(f"{k}={v}" for k, v in base.items()))


@pytest.fixture(scope="module")
def four_steps(ray_local, tmp_path_factory):
    from raypipe.train.trainer import fit

    root = tmp_path_factory.mktemp("four")
    write_fixture_run(str(root / "gen"), 16, seed=5, rows_per_part=4)
    result = fit(_fit_cfg(), [str(root / "gen" / "data")], root / "train")
    return root, result


def _copy(four_steps, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run's data and OUT (data, out) for a test to change."""
    root, _ = four_steps
    shutil.copytree(root, tmp_path / "copy")
    return tmp_path / "copy" / "gen" / "data", tmp_path / "copy" / "train"


@pytest.mark.slow
def test_grown_data_is_refused_and_new_plan_is_recorded(four_steps, tmp_path):
    from raypipe.train.trainer import fit

    data, out = _copy(four_steps, tmp_path)
    added = _add_part(data)
    with pytest.raises(ConfigError, match=f"files added: {added}(.|\n)*--new-plan"):
        fit(_fit_cfg(), [str(data)], out)
    result = fit(_fit_cfg(max_steps=2, export="true"), [str(data)], out, new_plan=True)
    assert result.resumed_from_step == 4 and result.steps == 6
    assert result.losses[:4] == four_steps[1].losses
    lineage = json.loads((out / "export" / "raypipe_lineage.json").read_text())
    assert lineage["plans"][0] == {"from_step": 0}
    new = lineage["plans"][1]
    assert new["new_plan"] is True and new["from_step"] == 4
    assert new["checkpoint"].endswith("step_00000004")
    assert new["changes"] == [f"data: {data}: files added: {added}"]
    # Lineage: the datasets in the card, image_token as it is.
    assert [d["path"] for d in lineage["datasets"]] == [str(data)]
    assert lineage["config"]["model"]["image_token"] == "<image>"
    card = (out / "export" / "README.md").read_text()
    sha = lineage["datasets"][0]["manifest_sha256"]
    assert sha and f"`{data}` (raypipe): manifest sha256 `{sha}`" in card
    assert "Not recorded" not in card
    assert "from step 4, a new plan (`--new-plan`)" in card and added in card


@pytest.mark.slow
def test_resume_skips_a_truncated_latest_checkpoint_and_matches(four_steps, tmp_path, caplog):
    from raypipe.train.trainer import fit

    data, out = _copy(four_steps, tmp_path)
    shard = out / "tiny" / "step_00000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        result = fit(_fit_cfg(), [str(data)], out)
    assert f"skipping checkpoint {out / 'tiny' / 'step_00000004'}: __1_0.distcp" in caplog.text
    assert result.resumed_from_step == 2 and result.steps == 4
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(four_steps[1].losses), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_a_crafted_metadata_stops_the_resume_before_any_worker(four_steps, tmp_path):
    from raypipe.train.trainer import fit

    data, out = _copy(four_steps, tmp_path)
    marker = tmp_path / "marker"
    (out / "tiny" / "step_00000004" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        fit(_fit_cfg(), [str(data)], out)
    assert not marker.exists()
