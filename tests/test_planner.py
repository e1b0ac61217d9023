"""The planner's decisions, in-process (no Ray): plan, dedup by index, replace, burn, stop."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raypipe.generate.executions import LATE_TASKS
from raypipe.generate.planner import Planner
from raypipe.generate.store import OutputStore
from raypipe.schema import REJECT_SCHEMA, sample_id

BANKS = {"color": [f"c{i}" for i in range(20)], "animal": [f"a{i}" for i in range(20)]}


def planner(tmp_path, quota, **kw) -> Planner:
    args = dict(
        out=str(tmp_path),
        run_seed=0,
        banks=BANKS,
        quota=quota,
        prompts_per_request=5,
        pull_chunks=8,
        replace_budget=1.0,
        near_duplicate_threshold=0.8,
    )
    args.update(kw)
    OutputStore(str(tmp_path)).makedirs()
    p = Planner(**args)
    p._pulls = 64  # past the ramp-up of the first pulls (tested on its own below)
    return p


def pulled(p: Planner) -> list[tuple[str, int]]:
    t = p.pull().to_pylist()
    return [(it["ability"], i) for it in t for i in it["indices"]]


def test_first_plan_is_each_abilitys_quota_in_chunks_of_k(tmp_path):
    p = planner(tmp_path, {"color": 7, "animal": 3})
    table = p.pull()
    items = table.to_pylist()
    rows = [(it["ability"], i) for it in items for i in it["indices"]]
    assert sorted(rows) == sorted(
        [("color", i) for i in range(7)] + [("animal", i) for i in range(3)]
    )
    for it in items:
        assert len(it["chunk_keywords"]) == 5
        assert all(i // 5 == it["chunk"] for i in it["indices"])
        assert it["ids"] == [sample_id(0, it["ability"], i) for i in it["indices"]]
    assert not p.finished()  # rows in flight
    p.report([(a, i, None) for a, i in rows])
    assert p.finished() and p.pull().num_rows == 0
    assert p.status()["stopped"] is None


def test_resume_plans_only_missing_ids(tmp_path):
    store = OutputStore(str(tmp_path))
    store.makedirs()
    done = [sample_id(0, "color", i) for i in (0, 1, 3)]
    store.write_table(
        "rejects",
        pa.Table.from_pylist(
            [
                {"id": d, "ability": "color", "stage": "quality", "reason": "x", "raw": ""}
                for d in done
            ],
            schema=REJECT_SCHEMA,
        ),
    )
    p = planner(tmp_path, {"color": 4})
    assert [i for _, i in pulled(p)] == [2, 4, 5, 6]


def test_reject_plans_one_replacement_and_never_beyond_quota(tmp_path):
    p = planner(tmp_path, {"color": 3})
    assert [i for _, i in pulled(p)] == [0, 1, 2]
    p.report([("color", 0, None), ("color", 1, "quality"), ("color", 2, None)])
    assert [i for _, i in pulled(p)] == [3]
    p.report([("color", 3, "quality")])
    assert [i for _, i in pulled(p)] == [4]
    # A repeated report of a decided row changes nothing.
    p.report([("color", 3, "quality")])
    p.report([("color", 4, None)])
    assert p.finished()
    st = p.status()
    assert st["abilities"]["color"]["need"] == 0 and st["planned"] == 5


def test_dedup_is_decided_by_index_not_arrival(tmp_path):
    p = planner(tmp_path, {"color": 3})
    pulled(p)
    same = "((red)) car on a street, realistic photo, 8k"
    # Row 2 arrives first with the same prompt as row 0: it waits.
    assert p.dedup([(sample_id(0, "color", 2), "color", 2, same)]) == []
    assert p.dedup([(sample_id(0, "color", 1), "color", 1, "((red)) kite over a lake")]) == []
    out = p.dedup([(sample_id(0, "color", 0), "color", 0, same)])
    assert [(sid[-1], reason) for sid, reason, _ in out] == [
        ("0", None),
        ("1", None),
        ("2", "duplicate_prompt"),
    ]
    assert out[2][2] == sample_id(0, "color", 0)
    # The duplicate was replaced at once, by the next index.
    assert [i for _, i in pulled(p)] == [3]


def test_rows_rejected_before_dedup_release_the_rows_after_them(tmp_path):
    p = planner(tmp_path, {"color": 2})
    pulled(p)
    assert p.dedup([(sample_id(0, "color", 1), "color", 1, "((red)) bus")]) == []
    out = p.dedup([(sample_id(0, "color", 0), "color", 0, None)])
    assert [r for _, r, _ in out] == [None, None]
    assert [i for _, i in pulled(p)] == [2]  # row 0's replacement


def test_burned_positions_are_never_planned(tmp_path):
    p = planner(tmp_path, {"color": 2})
    assert [i for _, i in pulled(p)] == [0, 1]
    # The chunk's answer failed at positions 1 (a planned row), 2 and 3 (not planned).
    p.burn("color", [1, 2, 3])
    p.report([("color", 0, None), ("color", 1, "quality")])
    assert [i for _, i in pulled(p)] == [4]


def test_replace_budget_bounds_the_rows_a_run_plans(tmp_path):
    p = planner(tmp_path, {"color": 2}, replace_budget=0.0)  # at least k = 5 replacements
    planned = [i for _, i in pulled(p)]
    for _ in range(10):
        p.report([("color", i, "quality") for i in planned])
        planned = [i for _, i in pulled(p)]
        if not planned:
            break
    st = p.status()
    assert st["abilities"]["color"]["planned"] == 7 and p.finished()
    assert st["stopped"] == "replace_budget"


def test_max_usd_stops_planning_and_unmade_rows_are_not_missing(tmp_path):
    p = planner(tmp_path, {"color": 4, "animal": 4}, max_usd=1.0, pull_chunks=1)
    first = pulled(p)  # one chunk: rows 0-3 of color
    assert first == [("color", i) for i in range(4)]
    p.spend(0.6)
    assert p.status()["stopped"] is None
    p.spend(0.5)
    assert p.status()["stopped"] == "max_usd"
    assert not p.finished()  # four rows still in flight
    assert p.stop_reason() == "max_usd"
    # The LLM stages handed the four rows back unmade.
    p.report([(a, i, "unmade") for a, i in first])
    assert p.finished() and p.pull().num_rows == 0
    from raypipe.generate.manifest import count_ids

    p.status()  # writes the plan log
    ids = count_ids(OutputStore(str(tmp_path)))
    assert ids["planned"] == 0 and ids["missing_ids"] == [] and ids["balanced"]
    # The next run plans the unmade rows again.
    again = planner(tmp_path, {"color": 4, "animal": 4}, pull_chunks=1)
    assert pulled(again) == first


@pytest.mark.parametrize("threshold", [0.8, 1.0])
def test_dedup_seeds_from_prompts_already_in_out(tmp_path, threshold):
    from fixture_data import write_fixture_parquet

    write_fixture_parquet(tmp_path / "data", 1)
    data = pa.concat_tables(
        [pa.parquet.read_table(f) for f in sorted((tmp_path / "data").glob("*.parquet"))]
    )
    prompt = data.column("prompt")[0].as_py()
    p = planner(tmp_path, {"color": 3}, near_duplicate_threshold=threshold)
    rows = pulled(p)
    out = p.dedup(
        [
            (sample_id(0, "color", i), "color", i, prompt if i == rows[0][1] else f"((c)) x{i} y z")
            for _, i in rows
        ]
    )
    assert out[0][1] == "duplicate_prompt"


def test_burned_positions_stay_burned_for_a_re_run(tmp_path):
    p = planner(tmp_path, {"color": 2})
    assert [i for _, i in pulled(p)] == [0, 1]
    p.burn("color", [1, 2, 3, 4])
    p.report([("color", 0, None), ("color", 1, "quality")])
    assert [i for _, i in pulled(p)] == [5]
    # Killed here, nothing in OUT: a re-run plans rows 0 and 1 again (row 1 to be rejected
    # with its reason, from the cached answer), and never the positions burned unplanned.
    again = planner(tmp_path, {"color": 2})
    assert [i for _, i in pulled(again)] == [0, 1]
    again.report([("color", 0, None), ("color", 1, "quality")])
    assert [i for _, i in pulled(again)] == [5]
    from raypipe.generate.manifest import count_ids

    ids = count_ids(OutputStore(str(tmp_path)))
    # The first planner logged rows 0 and 1 (its log is written with the burn); none is in
    # OUT, so both are listed as missing.
    assert ids["planned"] == 2 and ids["missing_ids"] == [sample_id(0, "color", i) for i in (0, 1)]
    assert not ids["balanced"]


def test_first_pulls_ramp_up_so_the_first_rows_start_early(tmp_path):
    p = planner(tmp_path, {"color": 100, "animal": 100})
    p._pulls = 0
    sizes = [len(pulled(p)) for _ in range(5)]
    assert sizes == [5, 10, 20, 40, 40]  # 1, 2, 4, 8, 8 chunks of k=5


def _plan_rows(p: Planner, plan: dict) -> list[tuple[str, int]]:
    """The rows of the plan's slices (its late read tasks are taken apart)."""
    return [
        (it["ability"], i)
        for t in range(plan["tasks"] - p.late_tasks)
        for it in p.take(plan["execution"], t).to_pylist()
        for i in it["indices"]
    ]


def test_an_execution_reads_a_fixed_plan_whose_read_tasks_never_wait(tmp_path):
    p = planner(tmp_path, {"color": 100, "animal": 100})
    plan = p.plan_execution()
    assert plan == {
        "execution": 0, "tasks": 8 + LATE_TASKS, "rows": 200, "top_up": False, "wait_s": 0.0
    }  # fmt: skip
    rows = _plan_rows(p, plan)
    assert sorted(rows) == sorted(
        [("color", i) for i in range(100)] + [("animal", i) for i in range(100)]
    )
    # The first read tasks are small (1, 2, 4, then 8 chunks of k=5): GPUs start early.
    assert [p.take(0, t).num_rows for t in range(4)] == [1, 2, 4, 8]
    # A read task that Ray runs again gets the same rows; an old execution's, none.
    assert p.take(0, 3).equals(p.take(0, 3))
    p.report([(a, i, None) for a, i in rows[:150]])
    again = p.plan_execution()  # the 50 rows pulled and undecided: planned again
    assert again["execution"] == 1 and again["rows"] == 50 and not again["top_up"]
    assert p.take(0, 0).num_rows == 0 and sorted(_plan_rows(p, again)) == sorted(rows[150:])
    p.report([(a, i, None) for a, i in rows[150:]])
    assert p.plan_execution()["tasks"] == 0 and p.finished()


def _late_rows(p: Planner, plan: dict, task: int) -> list[tuple[str, int]]:
    table = p.take(plan["execution"], plan["tasks"] - LATE_TASKS + task)
    return [(it["ability"], i) for it in table.to_pylist() for i in it["indices"]]


def test_late_read_tasks_make_replacements_of_rows_rejected_before_render(tmp_path):
    import threading

    p = planner(tmp_path, {"color": 10})
    plan = p.plan_execution()
    rows = _plan_rows(p, plan)
    p.report([("color", i, "prompts") for i in (2, 7)])  # rejected at prompts
    got: list = []
    late = threading.Thread(target=lambda: got.append(_late_rows(p, plan, 0)), daemon=True)
    late.start()
    late.join(0.5)
    assert late.is_alive() and not got, "a late read task went before rows 0-9 were past"
    p.past_dialogues([(a, i) for a, i in rows if i not in (2, 7)])  # an event, not a timing
    late.join(60)
    assert got == [[("color", 10), ("color", 11)]]  # the two replacements, this execution
    assert _late_rows(p, plan, 0) == got[0]  # run again by Ray: the same rows
    p.report([("color", 10, "dialogue")])
    p.past_dialogues([("color", 11)])
    assert _late_rows(p, plan, 1) == [("color", 12)]
    p.past_dialogues([("color", 12)])
    assert _late_rows(p, plan, 2) == []
    p.report([("color", i, None) for i in (0, 1, 3, 4, 5, 6, 8, 9, 11, 12)])
    assert p.finished() and p.plan_execution()["tasks"] == 0  # no top-up was needed
    assert p.status()["top_ups"] == 0


def test_late_read_tasks_take_nothing_once_a_row_was_handed_back(tmp_path):
    p = planner(tmp_path, {"color": 10})
    plan = p.plan_execution()
    p.report([("color", 2, "prompts")])
    _transient(p, [5, 6, 7, 8, 9])
    p.report([("color", i, "unmade", "llm_transient") for i in range(5, 10)])
    # Rows 0, 1, 3 and 4 are still before render: the late task does not wait for them.
    assert _late_rows(p, plan, 0) == []
    # A late task of an execution that ended takes nothing from the next one.
    p.past_dialogues([("color", i) for i in (0, 1, 3, 4)])
    p.report([("color", i, None) for i in (0, 1, 3, 4)])
    p.abilities["color"].due.clear()  # (the pause: tested below)
    nxt = p.plan_execution()
    assert sorted(_plan_rows(p, nxt)) == [("color", i) for i in range(5, 11)]
    assert nxt["top_up"]  # row 10 replaces row 2
    assert p.take(plan["execution"], plan["tasks"] - 1).num_rows == 0


def test_a_vllm_run_has_no_late_read_tasks_and_replaces_rejects_by_a_top_up(tmp_path):
    from raypipe.generate.executions import late_tasks

    # vLLM writers batch rows: a late read task would wait on rows a batch holds.
    assert late_tasks("vllm") == 0 and late_tasks("openai") == LATE_TASKS
    p = planner(tmp_path, {"color": 10}, late_tasks=late_tasks("vllm"))
    plan = p.plan_execution()
    assert plan["rows"] == 10 and len(_plan_rows(p, plan)) == 10  # no task waits
    p.report([("color", i, "prompts" if i in (2, 7) else None) for i in range(10)])
    plan = p.plan_execution()
    assert plan["top_up"]
    assert _plan_rows(p, plan) == [("color", 10), ("color", 11)]


def test_replacements_are_made_by_at_most_three_top_ups(tmp_path):
    from raypipe.generate import executions as planner_module

    p = planner(tmp_path, {"color": 10}, replace_budget=10.0)
    rows = _plan_rows(p, p.plan_execution())
    for top_up in range(planner_module.MAX_TOP_UPS + 1):
        # Every row but the first is rejected: each execution replaces them.
        p.report([("color", i, "quality") for _, i in rows[1:]] + [("color", rows[0][1], None)])
        plan = p.plan_execution()
        if top_up == planner_module.MAX_TOP_UPS:
            break
        assert plan["top_up"] and plan["rows"] == 9 - top_up, top_up
        before = max(i for _, i in rows)
        rows = _plan_rows(p, plan)
        assert min(i for _, i in rows) > before  # never-planned indices
    st = p.status()
    assert plan["tasks"] == 0 and st["stopped"] == "top_ups" and st["top_ups"] == 3
    assert st["abilities"]["color"]["need"] == 6  # 4 accepted of 10: the re-run continues


def test_rows_handed_back_pause_before_the_next_execution_makes_them(tmp_path, monkeypatch):
    import raypipe.generate.planner as planner_module

    clock = [1000.0]
    monkeypatch.setattr(planner_module.time, "monotonic", lambda: clock[0])
    p = planner(tmp_path, {"color": 10})
    p.plan_execution()
    _transient(p, range(5))
    p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5, 10)])
    p.report([("color", i, "unmade", "llm_transient") for i in range(5)])
    plan = p.plan_execution()  # rows 5-9 wait at dedup for rows 0-4, which pause
    assert plan["tasks"] == 0 and plan["wait_s"] == planner_module.REQUEUE_S
    clock[0] += planner_module.REQUEUE_S
    plan = p.plan_execution()
    # All ten again (5-9 were held at dedup when the execution ended): no top-up.
    assert plan["rows"] == 10 and not plan["top_up"] and p.status()["requeued"] == 5


def _transient(p: Planner, rows: list[int], ability: str = "color") -> list:
    """The prompt writer handed ``rows`` back: their request failed as transient."""
    light = [(sample_id(0, ability, i), ability, i, None, "llm_transient") for i in rows]
    return p.dedup(light)


def test_a_transient_failure_is_made_again_keeping_its_place_in_dedup(tmp_path, monkeypatch):
    import raypipe.generate.planner as planner_module

    monkeypatch.setattr(planner_module, "REQUEUE_S", 0.0)  # (the pause: tested above)
    p = planner(tmp_path, {"color": 10})
    assert sorted(i for _, i in pulled(p)) == list(range(10))
    # Chunk 0's request failed after its retries: its rows pass dedup untouched (to be
    # handed back), and chunk 1's rows wait for them, whatever order they came in.
    assert [r[1] for r in _transient(p, range(5))] == [None] * 5
    prompts = {i: f"((red)) thing number {i} {'x' * i}" for i in range(10)}
    prompts[5] = prompts[2]  # row 5 repeats row 2, and arrives first
    assert p.dedup([(sample_id(0, "color", i), "color", i, prompts[i]) for i in range(5, 10)]) == []
    p.report([("color", i, "unmade", "llm_transient") for i in range(5)])
    st = p.status()
    # Made again under the same ids: no position burned, no replacement budget spent.
    assert st["requeued"] == 5 and st["planned"] == 10 and st["abilities"]["color"]["burned"] == 0
    assert pulled(p) == [("color", i) for i in range(5)]
    out = p.dedup([(sample_id(0, "color", i), "color", i, prompts[i]) for i in range(5)])
    decided = {sid: reason for sid, reason, _ in out}
    assert decided[sample_id(0, "color", 5)] == "duplicate_prompt"  # lowest index wins
    assert decided[sample_id(0, "color", 2)] is None and len(decided) == 10
    # The replacement of the duplicate is the next free index, as without the outage.
    p.report([("color", i, None) for i in range(10) if i != 5] + [("color", 5, "dedup")])
    assert pulled(p) == [("color", 10)]


def test_a_halt_sends_handed_back_rows_through_unmade_so_the_rows_behind_are_decided(tmp_path):
    from raypipe.generate.manifest import count_ids

    p = planner(tmp_path, {"color": 10})
    pulled(p)
    _transient(p, range(5))
    assert (
        p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5, 10)])
        == []
    )
    p.halt("llm_outage")
    assert p.stop_reason() == "llm_outage"
    # The hand-backs arrive after the halt: each goes through once more, unmade, in order.
    p.report([("color", i, "unmade", "llm_transient") for i in range(5)])
    assert pulled(p) == [("color", i) for i in range(5)]
    light = [(sample_id(0, "color", i), "color", i, None, "llm_outage") for i in range(5)]
    assert len(p.dedup(light)) == 10  # rows 5-9 are decided now: nothing waits forever
    p.report([("color", i, "unmade", "llm_outage") for i in range(10)])  # none written
    assert p.finished() and p.pull().num_rows == 0
    st = p.status()
    assert st["stopped"] == "llm_outage"
    ids = count_ids(OutputStore(str(tmp_path)))
    assert ids["missing_ids"] == [] and ids["balanced"]
    # The next run makes the handed-back rows, under the same ids.
    again = planner(tmp_path, {"color": 10})
    assert pulled(again) == [("color", i) for i in range(10)]


def test_a_restarted_dedup_actor_stops_the_run_instead_of_waiting_for_its_lost_rows(tmp_path):
    from raypipe.generate.manifest import count_ids

    p = planner(tmp_path, {"color": 10})
    p.dedup_started()
    pulled(p)
    # Rows 5-9 reached the dedup actor and wait there for rows 0-4; then it crashed.
    assert (
        p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5, 10)])
        == []
    )
    p.dedup_started()  # Ray restarted it: the rows it held are gone
    assert p.pull().num_rows == 0  # at once: nothing more is pulled, nothing waits
    out = p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5)])
    assert {reason for _, reason, _ in out} == {"unmade"}  # handed back, not decided
    p.report([("color", i, "unmade", "actor_lost") for i in range(5)])
    st = p.status()
    assert st["stopped"] == "actor_lost" and st["lost_actor"] == "prompt dedup"
    ids = count_ids(OutputStore(str(tmp_path)))
    assert sorted(ids["missing_ids"]) == [sample_id(0, "color", i) for i in range(5, 10)]
    # The same command makes every row again, under the same ids.
    again = planner(tmp_path, {"color": 10})
    assert sorted(i for _, i in pulled(again)) == list(range(10))
    # A new execution starts a new dedup actor: that is no restart; nor is a restart
    # while no row is in flight (the dead actor held none).
    again.dedup_started()
    again.plan_execution()
    again.dedup_started()
    assert again.status()["lost_actor"] is None
    done = planner(tmp_path / "done", {"color": 10})
    done.dedup_started()
    pulled(done)
    light = [(sample_id(0, "color", i), "color", i, f"((red)) p{i % 5}") for i in range(10)]
    first = done.dedup(light)
    done.dedup_started()
    assert done.status()["lost_actor"] is None
    # Ray retries the crashed actor's block on the new one: decided as before.
    assert done.dedup(light) == first and [r[1] for r in first[5:]] == ["duplicate_prompt"] * 5
