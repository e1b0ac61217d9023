"""The planner's decisions, in-process (no Ray): plan, dedup by index, replace, burn, stop."""

from __future__ import annotations

import pyarrow as pa
import pytest

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


def test_pulls_wait_while_the_in_flight_window_is_full(tmp_path):
    import threading

    p = planner(tmp_path, {"color": 100, "animal": 100}, max_rows_in_flight=80)
    first = pulled(p) + pulled(p)
    assert len(first) == 80  # two full pulls of 40 fill the window
    got: list = []
    t = threading.Thread(target=lambda: got.append(pulled(p)), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not got, "a pull went out past the window"
    p.report([(a, i, None) for a, i in first[:40]])  # 40 rows decided: room for one pull
    t.join(60)  # an event: the pull returns once there is room (60 s: a bound, not a timing)
    assert not t.is_alive() and len(got[0]) == 40
    assert not {r for r in got[0]} & set(first)


def test_the_window_always_fits_one_full_pull(tmp_path):
    p = planner(tmp_path, {"color": 100}, max_rows_in_flight=3)
    assert p.max_in_flight == 40 and len(pulled(p)) == 40


def test_read_tasks_follow_the_rows_expected_not_the_most_that_may_be_planned(tmp_path):
    from raypipe.generate import source
    from raypipe.generate.source import tickets_for

    def first(n: int) -> int:
        quota = {"color": n // 2, "animal": n - n // 2}
        return tickets_for(planner(tmp_path / str(n), quota).status(), 8, 5)

    # Full pulls (8 chunks of 5 rows) for the open rows and half as many replacements
    # (1000 rows: 1500 rows, 300 chunks, 38 pulls), + spares.
    assert first(1000) == 38 + source.SPARE_TICKETS
    assert first(10_000) == 375 + source.SPARE_TICKETS
    # Growth with N: one read task per ~27 planned rows (it was one per 10).
    assert (first(10_000) - first(1000)) / 9000 < 1 / 26
    # Never more replacements than the budget allows.
    tight = planner(tmp_path / "tight", {"color": 100}, replace_budget=0.05).status()
    assert tickets_for(tight, 8, 5) == 3 + source.SPARE_TICKETS  # 105 rows, 21 chunks
    # A later execution (rejects outran the first) gets room for all it may still plan.
    assert tickets_for(tight, 8, 5, first=False) == 2 * 3 + 64  # as before: 105 rows


def _transient(p: Planner, rows: list[int], ability: str = "color") -> list:
    """The prompt writer handed ``rows`` back: their request failed as transient."""
    light = [(sample_id(0, ability, i), ability, i, None, "llm_transient") for i in rows]
    return p.dedup(light)


def test_a_transient_failure_is_made_again_keeping_its_place_in_dedup(tmp_path, monkeypatch):
    import raypipe.generate.planner as planner_module

    monkeypatch.setattr(planner_module, "REQUEUE_S", 0.05)
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
    assert pulled(p) == [("color", i) for i in range(5)]  # after a pause
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
    assert p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5, 10)]) == []
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
    assert p.dedup([(sample_id(0, "color", i), "color", i, f"((red)) p{i}") for i in range(5, 10)]) == []
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
    again.restart()
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
