"""The generation stream at work: streaming, replacements, URIs, budgets, reasoning models.

Each test runs the real job (tiny SD on CPU) against the loopback OpenAI-compatible
server, the shared Ray of the session and, for URIs, a real S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_generate import (  # noqa: E402
    _job_cmd,
    _job_env,
    demo_config,
    read_data,
    read_rejects,
    template_responder,
)

from raypipe.abilities import load_catalog  # noqa: E402
from raypipe.generate.keywords import keyword_for, seed_bank
from raypipe.generate.manifest import count_ids  # noqa: E402
from raypipe.generate.pipeline import generate  # noqa: E402
from raypipe.generate.store import OutputStore  # noqa: E402
from raypipe.jobs import generate as generate_job  # noqa: E402
from raypipe.schema import sample_id  # noqa: E402

PROMPT_MARK = "Keywords to use, one per prompt:"
KEY = "RAYPIPE_STREAM_TEST_KEY"


def openai_overrides(server: LLMServer, *more: str) -> list[str]:
    os.environ[KEY] = "sk-stream-test-0123456789"
    return [
        "llm.backend=openai",
        f"llm.base_url={server.url}",
        f"llm.api_key_env={KEY}",
        "llm.model=test-model",
        *more,
    ]


class Recorder:
    """Wraps a responder: when each prompt request was answered, and which keywords;
    prompt requests take ``prompt_latency_s`` more than the server's latency."""

    def __init__(self, respond, prompt_latency_s: float = 0.0):
        self.respond = respond
        self.prompt_latency_s = prompt_latency_s
        self.prompt_answers: list[float] = []
        self.prompt_keywords: list[list[str]] = []

    def __call__(self, messages):
        user = messages[-1]["content"]
        if PROMPT_MARK in user:
            time.sleep(self.prompt_latency_s)
            block = user.split(PROMPT_MARK)[1].split("\n\n")[0]
            self.prompt_keywords.append(re.findall(r"^\d+\.\s*(.+)$", block.strip(), flags=re.M))
            self.prompt_answers.append(time.time())
        return self.respond(messages)


@pytest.mark.slow
def test_rendering_starts_while_prompts_are_still_answered(ray_local, tiny_dir, tmp_path):
    # Prompts are slow (26 requests, one at a time: ~18 s), dialogues fast: the GPUs
    # must start on the rows whose dialogues are written while prompts still come in.
    rec = Recorder(template_responder(), prompt_latency_s=0.7)
    with LLMServer(responder=rec, latency_s=0.02, lifetime_s=600) as server:
        cfg = demo_config(
            *openai_overrides(
                server,
                "llm.concurrency=1",
                "llm_batch_chunks=1",
                "num_samples=130",
                "part_max_seconds=5",
                "render.width=32",
                "render.height=32",
            )
        )
        start = time.time()
        manifest = generate(cfg, str(tmp_path))
    parts = sorted((tmp_path / "data").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    data = read_data(tmp_path)
    first_render = min(json.loads(r["meta"])["render_wall"][0] for r in data) - start
    last_prompt = max(rec.prompt_answers) - start
    print(f"first render call at {first_render:.1f}s, last prompt answered at {last_prompt:.1f}s")
    assert first_render < last_prompt, (first_render, last_prompt)
    assert len(parts) > 1  # flushed by age, then more parts
    assert len(data) == 130 and manifest["counts"]["balanced"]


def _bad_positions_responder(bad: set[str], refuse_after_first: bool = False):
    """Good answers, except the lines for keywords in ``bad``; optionally every prompt
    request but the first gets a refusal (as a model that turned unhelpful)."""
    good = template_responder()
    seen: list[int] = []

    def respond(messages):
        text = good(messages)
        user = messages[-1]["content"]
        if PROMPT_MARK not in user:
            return text
        seen.append(1)
        if refuse_after_first and len(seen) > 1:
            return "I'm sorry, I can't help with that."
        lines = text.splitlines()
        return "\n".join(
            f"{ln.split('.')[0]}. a nice picture of something"
            if any(f"(({kw}))" in ln for kw in bad)
            else ln
            for ln in lines
        )

    return respond


def test_partly_malformed_answer_keeps_good_rows_and_replaces_the_rest(
    ray_local, tiny_dir, tmp_path
):
    # One 5-prompt answer with 2 malformed prompts (positions 1 and 3 of chunk 0). The
    # bank is the seed bank (extra_keywords_per_ability is 0): no run needed to read it.
    assert demo_config().extra_keywords_per_ability == 0
    bank = seed_bank(load_catalog(None, names=["color"])["color"])
    bad = {keyword_for(bank, 0, "color", i) for i in (1, 3)}

    # The same run: 3 good rows kept, the 2 replacements sent as new requests, accepted.
    rec = Recorder(_bad_positions_responder(bad))
    out = tmp_path / "same"
    with LLMServer(responder=rec, lifetime_s=300) as server:
        generate(
            demo_config(*openai_overrides(server, "abilities=[color]", "num_samples=5")), str(out)
        )
        answered = dict(server.answered_by_hash)
    ids = {r["id"] for r in read_data(out)}
    assert ids == {sample_id(0, "color", i) for i in (0, 2, 4, 5, 6)}
    rejected = {(r["id"], r["stage"]) for r in read_rejects(out)}
    assert rejected == {(sample_id(0, "color", i), "prompts") for i in (1, 3)}
    assert len(rec.prompt_keywords) == 2  # chunk 0, then chunk 1 for the replacements
    assert max(answered.values()) == 1

    # A re-run: the first run gets refusals for every replacement and ends short; the
    # re-run, with the model answering well again, never reuses a failed answer.
    out = tmp_path / "rerun"
    rec = Recorder(_bad_positions_responder(bad, refuse_after_first=True))
    with LLMServer(responder=rec, lifetime_s=300) as server:
        cfg = demo_config(
            *openai_overrides(server, "abilities=[color]", "num_samples=5", "replace_budget=0")
        )
        first = generate(cfg, str(out))
        assert first["stopped"] == "replace_budget" and len(read_data(out)) == 3
        failed_requests = set(server.answered_by_hash)
        server.responder = _bad_positions_responder(bad)  # answers well from now on
        server.reset_counts()
        again = generate(cfg, str(out))
        new_requests = set(server.answered_by_hash)
    assert len(read_data(out)) == 5 and again["stopped"] is None
    assert not new_requests & failed_requests
    assert again["counts"]["balanced"]
    assert not {r["id"] for r in read_data(out)} & {r["id"] for r in read_rejects(out)}


def test_max_usd_stops_the_run_and_the_rerun_completes_it(ray_local, tiny_dir, tmp_path):
    """Also a reasoning model's run: the server refuses ``max_tokens`` and ``temperature``
    for it (OpenAI's 400), so every request must send ``max_completion_tokens``."""
    with LLMServer(
        responder=template_responder(),
        models=("o4-mini",),
        reasoning_models=("o4-mini",),
        lifetime_s=300,
    ) as server:
        # $100 per million tokens: about 6 cents a request.
        price = "llm.prices={o4-mini: [100, 100]}"
        base = openai_overrides(
            server, "llm.model=o4-mini", price, "abilities=[color,animal]", "num_samples=20"
        )
        base += ["llm_batch_chunks=1", "llm.concurrency=1"]
        first = generate(demo_config(*base, "max_usd=0.5"), str(tmp_path))
        run = first["runs"][-1]
        assert first["stopped"] == "max_usd"
        # Requests already sent when the cap was reached still count: at most one batch
        # of each LLM stage (a prompt request and 5 dialogues) beyond it.
        assert 0.5 <= run["llm"]["cost_usd"] < 0.5 + 6 * 0.1, run["llm"]
        assert run["rows_unmade"] > 0
        made = len(read_data(tmp_path))
        assert 0 < made < 20 and first["counts"]["balanced"]
        again = generate(demo_config(*base), str(tmp_path))
        repeats = [h for h, n in server.answered_by_hash.items() if n > 1]
        refused = server.fault_counts.get("unsupported_param", 0)
    assert refused == 0  # the reasoning model got max_completion_tokens, no temperature
    rows = read_data(tmp_path)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert again["stopped"] is None and again["counts"]["balanced"]
    assert repeats == []  # nothing answered in the first run was paid for again


@pytest.mark.slow
def test_s3_run_killed_and_rerun_elsewhere_pays_nothing_twice(
    s3_server, ray_local, tiny_dir, tmp_path, monkeypatch
):
    """OUT on a real S3-compatible server: kill the job (a real SIGKILL of its process
    group, its own Ray included), then re-run the same command from another folder. The
    re-run is the job's ``main`` in this process, on the session's Ray, as
    ``test_killed_job_resumes_without_loss_duplicates_or_repaid_requests`` does."""
    bucket = s3_server.make_bucket("raypipe-stream")
    uri = s3_server.uri(bucket, "run")
    env = _job_env(tiny_dir)
    env[KEY] = "sk-stream-test-0123456789"
    with LLMServer(responder=template_responder(), latency_s=0.3, lifetime_s=600) as server:
        overrides = [
            "--num-samples",
            "24",
            "--abilities",
            "color,animal",
            *openai_overrides(server, "llm.concurrency=1", "llm_batch_chunks=1"),
            "part_max_rows=4",
            "part_max_seconds=2",
            "lease_ttl_s=2",  # the killed run's lease, taken over by the re-run
            "lease_renew_s=0.5",
        ]
        cmd = _job_cmd(uri, *overrides)
        first_dir = tmp_path / "one"
        first_dir.mkdir()
        # stderr to a file: a pipe nobody reads would block the job once it fills.
        log_path = tmp_path / "killed-job.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed after the kill
        proc = subprocess.Popen(
            cmd, env=env, cwd=first_dir, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        fs = s3_server.filesystem()
        deadline = time.time() + 240
        from pyarrow.fs import FileSelector

        def parts() -> int:
            sel = FileSelector(f"{bucket}/run/data", allow_not_found=True)
            return sum(1 for f in fs.get_file_info(sel) if f.base_name.startswith("part-"))

        while time.time() < deadline and proc.poll() is None and parts() < 2:
            time.sleep(0.3)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        answered = dict(server.answered_by_hash)

        other = tmp_path / "two"
        other.mkdir()
        time.sleep(2.5)  # the killed run's lease expires
        monkeypatch.chdir(other)
        assert generate_job.main([*cmd[2:], "--take-over-lease"]) == 0
        again = {h: n - answered.get(h, 0) for h, n in server.answered_by_hash.items()}
    store = OutputStore(uri)
    data = store.read_columns("data", ["id"]).column("id").to_pylist()
    assert len(data) == 24 and len(set(data)) == 24
    assert all(again.get(h, 0) == 0 for h in answered), "an answered request was paid again"
    assert not (first_dir / "cache").exists() and not (other / "cache").exists()
    assert count_ids(store)["balanced"]


@pytest.mark.slow
def test_a_thousand_rows_with_a_tenth_of_prompts_rejected_render_in_full_batches(
    ray_local, tiny_dir, tmp_path
):
    # A tenth of the bank's keywords get a malformed prompt line: about one prompt in
    # ten is rejected, and its replacement is made by a top-up execution.
    bank = seed_bank(load_catalog(None, names=["color"])["color"])
    bad = set(bank[::10])
    answer = _bad_positions_responder(bad)
    taken = [0]

    def respond(messages):  # a 58-keyword bank, 1,000 prompts: each made unique
        lines = answer(messages).splitlines()
        if PROMPT_MARK not in messages[-1]["content"]:
            return "\n".join(lines)
        taken[0] += 1
        return "\n".join(f"{ln}, take {taken[0]}-{i}" for i, ln in enumerate(lines))

    with LLMServer(responder=respond, lifetime_s=900) as server:
        cfg = demo_config(
            *openai_overrides(
                server,
                "abilities=[color]",
                "num_samples=1000",
                "near_duplicate_threshold=1.0",  # exact repeats only
                "replace_budget=0.5",
                "render.width=32",
                "render.height=32",
                "render.steps=1",
            )
        )
        manifest = generate(cfg, str(tmp_path))
    run = manifest["runs"][-1]
    ids = [r["id"] for r in read_data(tmp_path)]
    assert len(ids) == 1000 and len(set(ids)) == 1000, (
        manifest["stopped"],
        manifest["counts"],
        run,
    )
    assert manifest["stopped"] is None and manifest["counts"]["balanced"]
    rejected = manifest["counts"]["reject_reasons"]
    assert 50 <= sum(rejected.values()) <= 200, rejected  # about a tenth, all at prompts
    assert all(reason.startswith("prompts:") for reason in rejected)
    # Replacements of rows rejected before render are made by the execution's late
    # read tasks: no top-up, so the GPUs never wait for a new execution to start.
    assert run["stream_executions"] == 1 and run["top_ups"] == 0
    # Every render call is full but the last of each execution.
    calls = run["render"]
    per_call = {int(n): c for n, c in calls["rows_per_call"].items()}
    assert sum(n * c for n, c in per_call.items()) == run["images_rendered"] == 1000
    assert calls["calls"] == sum(per_call.values())
    assert calls["full_batch_calls"] == per_call[cfg.render.batch_size]
    assert calls["calls"] - calls["full_batch_calls"] <= 1  # the execution's last call
    assert calls["full_batch_calls"] >= 0.95 * calls["calls"], calls


def test_the_manifest_counts_render_calls_and_rows_per_call():
    """Rows carry the size of the pipeline call that rendered them; the tally turns them
    into calls, full-batch calls and a histogram that sums to the images rendered."""
    import pyarrow as pa

    from raypipe.generate.manifest import Tally

    sizes = [4] * 8 + [3] * 3 + [1]  # two full calls of 4, one of 3, one of 1
    metas = [json.dumps({"render_s": 0.1, "render_call_rows": n}) for n in sizes]
    metas.append(json.dumps({}))  # a row rejected before rendering
    n = len(metas)
    tally = Tally()
    tally.add(pa.table({"ability": ["color"] * n, "reject_stage": [None] * n,
                        "reject_reason": [None] * n, "meta": metas}))  # fmt: skip
    calls = tally.render_calls(batch_size=4)
    assert calls == {
        "calls": 4, "full_batch_calls": 2, "rows_per_call": {"1": 1, "3": 1, "4": 2},
        "idle_between_executions_s": 0,
    }  # fmt: skip
    assert tally.rendered == 12


def test_the_driver_collects_cyclic_garbage_while_the_stream_runs():
    """What Ray Data's scheduling loop leaves behind (a class per ``.options()`` call,
    freed only by the cyclic collector) is collected within a second or two while the
    stream runs, not left to the rare full collections of a large process; on exit the
    heap is unfrozen again."""
    import gc
    import weakref

    from raypipe.generate.stream import collecting_garbage

    def garbage_class() -> weakref.ref:
        class Wrapper:  # as ray.actor.ActorClass.options defines one per call
            def remote(self):
                return None

        return weakref.ref(Wrapper)

    before = garbage_class()  # garbage already when the stream starts
    gc.disable()  # so that only the stream's collector can free what follows
    try:
        with collecting_garbage(0.2):
            assert gc.get_freeze_count() > 0
            during = [garbage_class() for _ in range(50)]
            deadline = time.monotonic() + 5
            while any(r() is not None for r in during) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert all(r() is None for r in during), "made during the stream, not collected"
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
    gc.collect()
    assert before() is None
