"""OUT under faults: retried writes, two runs on one OUT, a changed dataset, writes that
fail half-way, lost rejects, a local OUT on a cluster, exit statuses.

Every test uses the session's Ray (``ray_local``) and S3 server (``s3_server``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import faults  # noqa: E402
from llm_server import LLMServer  # noqa: E402
from test_generate import demo_config, read_data, read_rejects, template_responder  # noqa: E402

from raypipe.errors import (  # noqa: E402
    ConfigError,
    IdentityChanged,
    LeaseExpired,
    LeaseHeld,
    LeaseLost,
)
from raypipe.generate import guards, pipeline  # noqa: E402
from raypipe.generate.manifest import count_ids  # noqa: E402
from raypipe.generate.pipeline import generate  # noqa: E402
from raypipe.generate.store import OutputStore  # noqa: E402
from raypipe.lease import Lease  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "RAYPIPE_OUT_TEST_KEY"
SMALL = ("abilities=[color,animal]", "num_samples=4", "part_max_rows=2")


def load_job():
    from raypipe.jobs import generate

    return generate


def job_args(out: str, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "raypipe/configs/generate/demo.yaml"), "--out", out, *overrides]


def openai(server: LLMServer, key_env: str = KEY, *more: str) -> list[str]:
    os.environ.setdefault(key_env, f"sk-{key_env.lower()}")
    return [
        "llm.backend=openai",
        f"llm.base_url={server.url}",
        f"llm.api_key_env={key_env}",
        "llm.model=test-model",
        *more,
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def ids_in(out: str) -> list[str]:
    return OutputStore(out).read_columns("data", ["id"]).column("id").to_pylist()


# ---------------------------------------------------------------------------------------
# 1. The lease
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_on_a_leased_out_stops_before_any_request_or_model(
    ray_local, tiny_dir, tmp_path, s3_server, monkeypatch, where
):
    out = str(tmp_path / "out")
    if where == "s3":
        out = s3_server.uri(s3_server.make_bucket("raypipe-lease-second"), "run")
    gate = threading.Event()
    respond = template_responder()

    def slow_first(messages):
        gate.wait(60)  # the first run holds OUT while the second one starts
        return respond(messages)

    with LLMServer(responder=slow_first, lifetime_s=300) as server:
        cfg = demo_config(*SMALL, *openai(server))
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(m=generate(cfg, out)))
        thread.start()
        deadline = time.time() + 120
        while not server.events and time.time() < deadline:
            time.sleep(0.05)
        assert server.events, "the first run sent no request"
        loads = []
        main_thread = threading.current_thread()
        real_check = pipeline.check_inputs

        def spy(*args, **kwargs):
            if threading.current_thread() is main_thread:
                loads.append("check_inputs")
            return real_check(*args, **kwargs)

        monkeypatch.setattr(pipeline, "check_inputs", spy)
        second_env = "RAYPIPE_OUT_SECOND_KEY"
        code = load_job().main(job_args(out, *SMALL, *openai(server, second_env)))
        second_key = os.environ[second_env]
        gate.set()
        thread.join(300)
    assert code == 75
    assert loads == [], "the second run checked or loaded models before the lease"
    assert not [e for e in server.events if second_key in e.authorization]
    ids = ids_in(out)
    assert len(ids) == 4 and len(set(ids)) == 4
    assert first["m"]["counts"]["balanced"]


def test_a_run_whose_lease_is_taken_over_publishes_nothing_more(ray_local, tiny_dir, tmp_path):
    out = tmp_path / "out"
    hold, gate = threading.Event(), threading.Event()
    respond = template_responder()

    def gated(messages):
        if hold.is_set():  # after the takeover: answers wait until the snapshot is taken
            gate.wait(60)
        return respond(messages)

    with LLMServer(responder=gated, latency_s=0.2, lifetime_s=300) as server:
        cfg = demo_config(
            "abilities=[color,animal]", "num_samples=20", "part_max_rows=1",
            "part_max_seconds=0.2", "lease_ttl_s=30", "lease_renew_s=0.3",
            *openai(server, KEY, "llm.concurrency=1", "llm_batch_chunks=1"),
        )  # fmt: skip
        result: dict = {}

        def run():
            try:
                result["manifest"] = generate(cfg, str(out))
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                result["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 180
        while time.time() < deadline and not list((out / "data").glob("part-*")):
            time.sleep(0.02)
        hold.set()
        assert list((out / "data").glob("part-*")), "no part before the takeover"
        # Another run takes OUT over (as --take-over-lease would after an expiry).
        from raypipe.lease import _lease_file

        other = {"run_id": "other", "host": "elsewhere", "pid": 1, "started_at": time.time()}
        lease_file = _lease_file(str(out))
        while not lease_file.replace(json.dumps(other).encode(), lease_file.read().version):
            pass  # a renewal came in between: replace what it wrote
        time.sleep(1.0)  # a publish that passed its fence just before may still land
        taken = snapshot(out)
        gate.set()
        thread.join(300)
    assert isinstance(result.get("error"), LeaseLost), result
    after = snapshot(out)
    new = {k for k in after if k not in taken or after[k] != taken[k]}
    assert not new, f"published after losing the lease: {sorted(new)}"
    assert len(ids_in(str(out))) < 20


# ---------------------------------------------------------------------------------------
# 2. One dataset identity
# ---------------------------------------------------------------------------------------


def test_every_config_field_has_a_class():
    from raypipe.generate.identity import FIELD_CLASS, leaf_fields, unclassified

    assert unclassified() == []
    assert set(FIELD_CLASS) == set(leaf_fields()), "entries for fields that no longer exist"
    assert FIELD_CLASS["llm.structured_output"] == "identity"


def test_a_new_field_without_a_class_is_caught():
    from pydantic import Field

    from raypipe.generate.config import GenerateConfig
    from raypipe.generate.identity import unclassified
    from raypipe.llm.config import LLMConfig

    class MoreLLM(LLMConfig):
        sparkle: bool = Field(False, description="a field added later")

    class More(GenerateConfig):
        llm: MoreLLM = Field(default_factory=MoreLLM)
        shiny: int = Field(0, description="another")

    assert unclassified(More) == ["llm.sparkle", "shiny"]


def test_a_changed_identity_is_refused_before_any_request(ray_local, tiny_dir, tmp_path):
    out = tmp_path / "out"
    with LLMServer(
        responder=template_responder(), models=("test-model", "other-model"), lifetime_s=300
    ) as server:
        args = [*SMALL, *openai(server)]
        generate(demo_config(*args), str(out))
        before, asked = snapshot(out), len(server.events)
        for change in ("seed=7", "render.model=raypipe-tiny/other-sd", "llm.model=other-model"):
            code = load_job().main(job_args(str(out), *args, change))
            assert code == 2, change
            assert snapshot(out) == before and len(server.events) == asked, change
            with pytest.raises(IdentityChanged, match=change.split("=")[0]):
                generate(demo_config(*args, change), str(out))
        manifest = generate(demo_config(*args, "seed=7"), str(out), accept_identity_change=True)
    assert manifest["runs"][-1]["identity_change"]["seed"] == [0, 7]
    assert json.loads((out / "identity.json").read_text())["fields"]["seed"] == 7


def test_operational_changes_extend_and_a_killed_runs_lost_part_and_lease_are_made_good(
    ray_local, tiny_dir, tmp_path
):
    """One OUT through three runs: operational changes proceed and a larger num_samples
    extends; then a killed run's lost part unbalances the manifest and its lease holds
    OUT until it expires and is taken over, and the resume makes exactly the lost rows."""
    out = tmp_path / "out"
    generate(demo_config(*SMALL), str(out))
    cfg = demo_config(
        *SMALL, "render.batch_size=2", "num_samples=6", "lease_ttl_s=1", "lease_renew_s=0.5"
    )
    manifest = generate(cfg, str(out))
    ids = ids_in(str(out))
    assert len(ids) == 6 and len(set(ids)) == 6 and manifest["counts"]["balanced"]
    before = snapshot(out)
    smaller = generate(demo_config(*SMALL, "num_samples=2"), str(out))
    assert "nothing to do" in smaller["note"] and snapshot(out) == before

    # A killed run: a part it had written is lost, and it left its lease.
    parts = sorted((out / "data").glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = pq.read_table(parts[0], columns=["id"]).column("id").to_pylist()
    parts[0].unlink()
    counted = count_ids(OutputStore(str(out)))
    assert not counted["balanced"] and counted["missing_ids"] == sorted(lost)
    Lease(str(out), ttl_s=1, renew_s=0.5).acquire()
    with pytest.raises(LeaseHeld, match="in use by another run"):
        generate(cfg, str(out))
    time.sleep(1.5)  # the store's clock passes the lease's expiry
    before = snapshot(out)
    with pytest.raises(LeaseExpired, match="--take-over-lease"):
        generate(cfg, str(out))
    assert snapshot(out) == before
    manifest = generate(cfg, str(out), take_over_lease=True)
    again = ids_in(str(out))
    assert len(again) == 6 and set(again) == set(ids)  # exactly the lost rows made again
    assert manifest["counts"]["balanced"]
    assert not (out / "lease.json").exists()  # released at the end


# ---------------------------------------------------------------------------------------
# 3. Whole or nothing, and idempotent by id
# ---------------------------------------------------------------------------------------


def test_s3_writes_failing_half_way_publish_nothing_and_a_retried_write_writes_ids_once(
    ray_local, tiny_dir, s3_server, tmp_path, monkeypatch
):
    """A part and a cache entry whose writes fail half-way leave nothing under their
    names; the next run completes. In that run, the writer task's worker dies right
    after handing its rows over (Ray runs the task again): each id is written once."""
    from ray import cloudpickle

    from raypipe.generate import writer
    from raypipe.llm.cache import ResponseCache

    bucket = s3_server.make_bucket("raypipe-half-way")
    out = s3_server.uri(bucket, "run")
    fs = s3_server.filesystem()
    store = OutputStore(out)
    store.fs = faults.HalfWritingFS(store.fs)
    rows = pa.table({"id": ["color-s0-0000000"], "ability": ["color"]})
    with pytest.raises(OSError, match="injected"):
        store.write_table("data", rows, name="part-x.parquet")
    final = f"{bucket}/run/data/part-x.parquet"
    assert fs.get_file_info(final).type.name == "NotFound" and final not in store.fs.opened
    cache = ResponseCache(OutputStore(out).cache_location())
    cache.fs = faults.HalfWritingFS(cache.fs)
    assert_put_whole_or_nothing(cache)
    # The next run starts (its planner reads every part) and completes, through a retried
    # write task.
    cloudpickle.register_pickle_by_value(faults)
    monkeypatch.setattr(faults, "MARKER", str(tmp_path / "died-once"))
    monkeypatch.setattr(writer, "write_block", faults.dying_write_block)
    manifest = generate(demo_config(*SMALL), out)
    assert (tmp_path / "died-once").exists(), "the write fault never fired"
    ids = ids_in(out)
    assert len(ids) == 4 and len(set(ids)) == 4, sorted(ids)
    assert manifest["counts"]["balanced"] and manifest["counts"]["duplicate_ids"] == []
    from pyarrow.fs import FileSelector

    left = fs.get_file_info(FileSelector(f"{bucket}/run", recursive=True))
    assert not [i.path for i in left if i.base_name.startswith(".tmp-")]


def assert_put_whole_or_nothing(cache) -> None:
    """A put whose write fails half-way leaves nothing under the entry's name."""
    key = "ab" + "0" * 62
    with pytest.raises(OSError, match="injected"):
        cache.put(key, {"text": "an answer " * 200})
    assert cache.get(key) is None
    assert cache.fs.get_file_info(cache.path(key)).type.name == "NotFound"
    # Not even for a moment: a reader in another process would have seen half an entry.
    assert cache.path(key) not in cache.fs.opened


def test_local_cache_put_failing_half_way_publishes_nothing(tmp_path):
    from raypipe.llm.cache import ResponseCache

    cache = ResponseCache(tmp_path / "cache")
    cache.fs = faults.HalfWritingFS(cache.fs)
    assert_put_whole_or_nothing(cache)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_the_whole_or_nothing_check_fails_a_put_straight_to_the_final_name(tmp_path, monkeypatch):
    """The check above is worth something: a put writing straight to the final path
    (the mutant of review T1) fails it."""
    from raypipe.llm import cache as cache_module

    def straight_put(self, key, entry):
        with self.fs.open_output_stream(self.path(key)) as f:
            f.write(json.dumps({"format": 2, **entry}).encode())

    (tmp_path / "cache" / "ab").mkdir(parents=True)
    monkeypatch.setattr(cache_module.ResponseCache, "put", straight_put)
    cache = cache_module.ResponseCache(tmp_path / "cache")
    cache.fs = faults.HalfWritingFS(cache.fs)
    with pytest.raises(AssertionError):
        assert_put_whole_or_nothing(cache)


def test_only_a_finished_out_is_left_alone_by_an_equal_run(tmp_path):
    """nothing_to_add returns a finished OUT's manifest at once (no lease, no actor), and
    lets every other OUT run: a row short, a row planned but lost, a stopped run, a
    stale manifest, an accepted identity change."""
    from raypipe.schema import sample_id

    names = ["color", "animal"]
    cfg = demo_config("abilities=[color,animal]", "num_samples=4")
    store = OutputStore(str(tmp_path))
    store.makedirs()
    ids = [(a, sample_id(0, a, i)) for a in names for i in range(2)]
    store.write_table("plan", pa.table({"id": [i for _, i in ids], "state": ["planned"] * 4}))
    store.write_table("data", pa.table({"id": [i for _, i in ids], "ability": [a for a, _ in ids]}))
    manifest = {"counts": {"accepted": 4, "balanced": True}, "stopped": None, "runs": [{}]}
    store.write_json("manifest.json", manifest)

    done = guards.nothing_to_add(cfg, store, names)
    assert "nothing to do" in done["note"] and done["runs"] == [{}]
    assert guards.nothing_to_add(cfg, store, names, identity_changed=True) is None
    assert guards.nothing_to_add(demo_config("num_samples=4"), store, names + ["food"]) is None
    for changed in ({"stopped": "actor_lost"}, {"counts": {"accepted": 3, "balanced": True}}):
        store.write_json("manifest.json", {**manifest, **changed})
        assert guards.nothing_to_add(cfg, store, names) is None, changed
    store.write_json("manifest.json", manifest)
    lost = sample_id(0, "color", 2)  # planned, in neither data nor rejects
    store.write_table("plan", pa.table({"id": [lost], "state": ["planned"]}))
    assert guards.nothing_to_add(cfg, store, names) is None


def test_temporaries_are_cleaned_by_the_next_run_holding_out(tmp_path):
    store = OutputStore(str(tmp_path))
    for sub in ("data", "plan", "cache", ""):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / ".tmp-dead-part.parquet").write_bytes(b"half")
    (tmp_path / "manifest.json.tmp-0123").write_text("{")  # an older raypipe's name
    (tmp_path / "keywords").mkdir()
    (tmp_path / "keywords" / "color.json.tmp-0123").write_text("{")
    store.makedirs()
    assert not list(tmp_path.rglob("*.tmp-*")), sorted(tmp_path.rglob("*"))


# ---------------------------------------------------------------------------------------
# 4. Rejects re-made; 5. shared OUT; 6. exit statuses
# ---------------------------------------------------------------------------------------


def test_malformed_answers_are_rejected_and_rejects_lost_at_a_kill_are_made_again(
    ray_local, tiny_dir, tmp_path
):
    out = tmp_path / "out"
    bad = frozenset({"turquoise", "royal blue"})  # color rows 0 and 1: malformed prompts
    with LLMServer(responder=template_responder(bad), lifetime_s=300) as server:
        args = ["abilities=[color]", "num_samples=6", *openai(server)]
        manifest = generate(demo_config(*args), str(out))
        # Malformed LLM output is rejected, with its reason and raw text, and replaced.
        rows, rejects = read_data(out), read_rejects(out)
        assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
        prompt_rejects = [r for r in rejects if r["stage"] == "prompts"]
        assert prompt_rejects, "malformed prompt answers must land in rejects"
        assert all(r["reason"] and "Sure! Here are" in r["raw"] for r in prompt_rejects)
        assert not {r["id"] for r in rejects} & {r["id"] for r in rows}
        assert manifest["counts"]["rejected"] == len(
            [r for r in rejects if r["stage"] != "keywords"]
        )
        assert os.environ[KEY] not in (out / "manifest.json").read_text()
        rejected = {r["id"] for r in rejects if r["stage"] != "keywords"}
        assert rejected, "the run rejected nothing"
        # A kill with the rejects still buffered and their replacements written:
        for part in (out / "rejects").glob("part-*.parquet"):
            part.unlink()
        assert count_ids(OutputStore(str(out)))["missing_ids"] == sorted(rejected)
        code = load_job().main(job_args(str(out), *args))
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["balanced"] and manifest["counts"]["missing_ids"] == []
    assert {r["id"] for r in read_rejects(out)} >= rejected
    assert len(read_data(out)) == 6


def test_chunk_request_is_sent_once_when_a_replacement_falls_in_it(tmp_path):
    from test_planner import planner

    p = planner(tmp_path, {"color": 8}, pull_chunks=1)
    first, second = p.pull(), p.pull()  # chunk 0 (0-4), chunk 1 (5-7), both out
    assert first.column("indices").to_pylist() == [[0, 1, 2, 3, 4]]
    assert second.column("indices").to_pylist() == [[5, 6, 7]]
    ids = first.column("ids").to_pylist()[0]
    p.dedup([(ids[0], "color", 0, None)])  # row 0 rejected: its replacement is row 8
    with p._cond:
        assert p._take(5) == [], "row 8 went out while chunk 1's request was in flight"
    second_ids = second.column("ids").to_pylist()[0]
    p.dedup([(sid, "color", i, f"prompt {i}") for sid, i in zip(second_ids, (5, 6, 7))])
    assert p.pull().column("indices").to_pylist() == [[8]]


def test_the_age_flusher_survives_a_failed_write(tmp_path, monkeypatch):
    from raypipe.generate.writer import PartWriter
    from raypipe.schema import REJECT_SCHEMA

    w = PartWriter(str(tmp_path), planner=None, part_max_rows=100, part_max_seconds=0.1)
    real, fails = w.store.write_table, []

    def flaky(sub, table, name=None):
        if not fails:
            fails.append(1)
            raise OSError("injected: a failed write")
        return real(sub, table, name)

    monkeypatch.setattr(w.store, "write_table", flaky)
    row = {"id": "color-s0-0000000", "ability": "color", "stage": "render", "reason": "x"}
    with w._lock:
        w._buffers["rejects"].append(pa.Table.from_pylist([row], schema=REJECT_SCHEMA))
        w._since["rejects"] = time.monotonic()
    deadline = time.time() + 30
    while w.parts_written == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert fails and w.flush_errors == 1 and w.parts_written == 1
    assert w._thread.is_alive()
    w.close()


def test_a_local_out_on_a_multi_node_cluster_needs_a_folder_every_node_sees(
    ray_local, tmp_path, monkeypatch
):
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [{"NodeID": here, "Alive": True}, {"NodeID": "f" * 56, "Alive": True}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    store = OutputStore(str(tmp_path / "out"))

    def elsewhere(node, fn, path):  # another node's own disk
        fn(str(tmp_path / "other-disk" / Path(path).name))

    with pytest.raises(ConfigError, match="s3://"):
        guards.check_shared_out(store, run_on=elsewhere)
    guards.check_shared_out(store, run_on=lambda node, fn, path: fn(path))  # shared
    assert not list((tmp_path / "out").glob(".tmp-*"))
    guards.check_shared_out(OutputStore("s3://bucket/run?endpoint_override=x"))


def test_a_run_stopped_at_max_usd_exits_75(monkeypatch, tmp_path):
    job = load_job()
    manifest = {
        "stopped": "max_usd", "num_samples": 4, "runs": [], "counts": {
            "accepted": 2, "rejected": 0, "balanced": True, "missing_ids": [],
            "abilities": {}, "reject_reasons": {},
        },
    }  # fmt: skip
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: manifest)
    monkeypatch.setattr("raypipe.generate.manifest.summary_table", lambda m: "")
    assert job.main(job_args(str(tmp_path), "max_usd=1")) == 75
