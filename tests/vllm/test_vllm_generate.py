"""The ``vllm`` backend end to end, on vLLM's CPU build with a tiny random-weight Llama.

Engine starts are what these tests cost (tens of seconds each on 2 CPUs), so the whole
module shares one: the engines are a Serve application on the session's Ray cluster
(``ray_vllm``), which the generation jobs join (RAY_ADDRESS). The killed run starts them
(its kill leaves them up, as on a cluster), its resume finds and uses them
(``llm.vllm.keep_engines=true`` keeps them up after it), the re-run from the cache needs
none, and the request-level checks and the benchmark-item writer use the same engines
through VLLMBackend. Last, a test kills an engine: Serve replaces it, the second and last
engine start (counted by the last test). The checks of the driver's cache check and of a
dying engine stage start none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray

from raypipe.abilities import load_catalog
from raypipe.config import load_config
from raypipe.errors import ModelError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.keywords import keyword_for, seed_bank
from raypipe.generate.llm_stage import stable_seed
from raypipe.generate.manifest import count_ids
from raypipe.generate.pipeline import generate
from raypipe.generate.store import OutputStore
from raypipe.llm import tasks as structured
from raypipe.llm.cache import request_key
from raypipe.llm.request_body import request_body
from raypipe.llm.tasks import dialogue_request, parse_dialogue, parse_prompts, prompt_request
from raypipe.llm.vllm import engine_failure, service_name
from raypipe.schema import validate_samples

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "raypipe" / "configs" / "generate" / "demo-vllm.yaml"
N = 26  # the preset's two rows per ability
# Small parts, so the kill lands after the first render call.
OVERRIDES = [
    "part_max_rows=4",
    "part_max_seconds=2",
    "llm_batch_chunks=1",
    "log_to_driver=false",
    "lease_ttl_s=2",  # a killed run's lease expires soon; the resume takes it over
    "lease_renew_s=0.5",
]
LIMIT_S = 900


def job_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "generate.py"), "--config", str(PRESET),
            "--out", str(out), *OVERRIDES, *overrides]  # fmt: skip


def job_env(tiny_dir: Path, address: str) -> dict[str, str]:
    """The jobs join the session's Ray cluster (at ``address``), where the engines live."""
    env = dict(os.environ)
    env.update(
        RAYPIPE_TINY_DIR=str(tiny_dir), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=address,
    )  # fmt: skip
    return env


def data_parts(out: Path) -> list[Path]:
    return sorted((out / "data").glob("part-*.parquet"))


def rows_by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}


def cache_files(out: Path) -> dict[str, int]:
    """Every stored answer, with its modification time (a rewrite changes it)."""
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in (out / "cache").rglob("*.json")
        if not p.name.startswith(".")
    }


def run_job(out: Path, env: dict[str, str], *overrides: str) -> float:
    start = time.time()
    done = subprocess.run(job_cmd(out, *overrides), env=env, capture_output=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return time.time() - start


#: What the jobs after the killed one add: leave the engines up for the next test.
KEEP = "llm.vllm.keep_engines=true"


def engine_replicas() -> list[dict]:
    """Every replica of the demo-vllm engines this Ray cluster has run, dead or alive
    (Ray's actor table): one per engine start."""
    from ray._private.state import actors

    name = f"ServeReplica:{service_name(vllm_config().llm)}:EngineServer"
    return [a for a in actors().values() if a["ActorClassName"] == name]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_dir, ray_vllm):
    """demo-vllm killed (SIGKILL of the job's process group) once its first Parquet part
    is written, then the same command run to the end."""
    out = tmp_path_factory.mktemp("vllm") / "run"
    env = job_env(tiny_dir, ray_vllm.get_runtime_context().gcs_address)
    assert not engine_replicas()
    log = out.parent / "killed-run.log"  # a file, not a pipe: vLLM and Ray Data log a lot
    start = time.time()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            job_cmd(out), env=env, start_new_session=True, stdout=err, stderr=err
        )
        while time.time() - start < LIMIT_S and proc.poll() is None and not data_parts(out):
            time.sleep(0.2)
        assert proc.poll() is None, "finished before the kill: " + log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_s = time.time() - start
    before = SimpleNamespace(
        ids=[
            r["id"] for p in data_parts(out) for r in pq.read_table(p, columns=["id"]).to_pylist()
        ],
        cache=cache_files(out),
    )
    time.sleep(2.5)  # the killed run's lease expires
    resume_s = run_job(out, env, KEEP, "--take-over-lease")
    print(
        f"killed after {killed_s:.0f}s ({len(before.ids)} rows written), resumed in {resume_s:.0f}s"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    return SimpleNamespace(out=out, env=env, before=before, manifest=manifest)


def test_demo_vllm_writes_every_ability_with_the_same_schema(resumed):
    out, manifest = resumed.out, resumed.manifest
    table = pq.read_table(out / "data")
    assert validate_samples(table) == []  # raypipe.schema.SAMPLE_SCHEMA, like every backend
    rows = table.to_pylist()
    abilities = Counter(r["ability"] for r in rows)
    assert len(abilities) == 13 and set(abilities.values()) == {2}, abilities
    assert {r["llm_model"] for r in rows} == {"raypipe-tiny/tiny-chat-llm"}
    for r in rows:  # the stage's rule, from the schema: the row's keyword opens its prompt
        assert r["prompt"].startswith(f"(({r['keywords'][0]}))")
        assert r["conversations"][1]["value"]
    rejects = pq.read_table(out / "rejects").to_pylist() if (out / "rejects").exists() else []
    assert all(r["reason"] and r["stage"] for r in rejects)
    counts = manifest["counts"]
    assert counts["balanced"] and counts["accepted"] == N
    assert counts["planned"] == counts["accepted"] + counts["rejected"]
    for stage in counts["stages"].values():
        assert stage["in"] == stage["accepted"] + stage["rejected"]
    # Tokens per stage, from the engines' counts: generated in this run (the resume), or
    # served from OUT/cache (what the killed run had generated), never both.
    run = manifest["runs"][-1]
    for stage in ("prompts", "dialogue"):
        usage = run["llm"]["stages"][stage]
        assert usage["prompt_tokens"] + usage["cached_prompt_tokens"] > 0, stage
        assert usage["completion_tokens"] + usage["cached_completion_tokens"] > 0, stage
    # Whether the resume serves any prompt from OUT/cache depends on where the kill lands
    # (the rows of the first part may hold every prompt answered by then); that no
    # persisted answer is generated again is checked on the cache files themselves
    # (test_killed_run_resumes_without_loss_duplicates_or_regeneration).
    assert manifest["llm"]["cost_usd"] == 0  # no token prices on vllm
    # The engines answer faster than the CPU renders, so the LLM stages may have asked
    # for every row before the kill. A writer whose requests OUT/cache answers runs
    # without engines; one that still has rows never asked for runs on the engines,
    # which the resume found up (the killed run had started them) and paid for the time
    # it held them (no GPU-seconds: CPU engines).
    on = {w["on"] for w in run["llm_writers"].values()}
    assert on <= {"engines", "cache"}, run["llm_writers"]
    engines = run["llm_engines"]
    if "engines" in on:
        assert engines["engines"] == 0 and engines["found_running"], engines
        assert engines["engine_s"] > 0 and engines["gpu_s"] == 0
    else:
        assert resumed.before.cache == cache_files(resumed.out), "a request was asked again"
    assert manifest["versions"]["vllm"] != "not installed"


def test_killed_run_resumes_without_loss_duplicates_or_regeneration(resumed):
    out = resumed.out
    ids = [r["id"] for r in pq.read_table(out / "data", columns=["id"]).to_pylist()]
    assert len(ids) == N and len(set(ids)) == N
    assert set(resumed.before.ids) <= set(ids)  # rows written before the kill are kept
    assert 0 < len(resumed.before.ids) < N
    counted = count_ids(OutputStore(str(out)))
    assert counted["balanced"] and not counted["duplicate_ids"] and not counted["missing_ids"]
    # No answer stored before the kill was generated again (a new answer rewrites its entry).
    now = cache_files(out)
    rewritten = [p for p, mtime in resumed.before.cache.items() if now.get(p) != mtime]
    assert resumed.before.cache and not rewritten, rewritten
    # The resume answered only what the killed run had not (maybe nothing: see above).
    on = {w["on"] for w in resumed.manifest["runs"][-1]["llm_writers"].values()}
    if "engines" not in on:
        assert len(now) == len(resumed.before.cache)


def test_rerun_over_the_same_out_reproduces_every_row_from_the_cache(resumed, tmp_path):
    again = fresh_copy(resumed.out, tmp_path / "again")
    stored = cache_files(again)
    run_job(again, resumed.env, KEEP)
    before, after = rows_by_id(resumed.out), rows_by_id(again)
    assert set(after) == set(before)
    for sid, row in after.items():
        for col in ("prompt", "keywords", "seed", "conversations", "question_type", "image"):
            assert row[col] == before[sid][col], (sid, col)
    assert cache_files(again) == stored  # nothing generated: every answer came from OUT/cache
    run = json.loads((again / "manifest.json").read_text())["runs"][-1]
    llm = run["llm"]
    assert llm["completion_tokens"] == 0 and llm["cached_completion_tokens"] > 0
    # The driver found every request answered in OUT/cache, and no replacement needed the
    # engines either: the run did not touch them (though they were up).
    assert run["llm_engines"] == {
        "engines": 0, "found_running": False, "engine_s": 0.0, "gpus_per_engine": 0.0,
        "gpu_s": 0.0,
    }  # fmt: skip
    assert run["llm_writers"] == {
        "prompts": {"on": "cache", "requests": 13, "unanswered": 0},
        "dialogue": {"on": "cache", "requests": run["llm_writers"]["dialogue"]["requests"],
                     "unanswered": 0},
    }  # fmt: skip
    assert run["llm_writers"]["dialogue"]["requests"] >= N


def fresh_copy(out: Path, to: Path) -> Path:
    """``out`` as a re-run finds it: cache and keyword banks, no rows, plan or manifest."""
    shutil.copytree(out, to)
    for name in ("data", "rejects", "plan", "manifest.json"):
        target = to / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return to


def test_driver_cache_check_is_exact_about_each_writer(resumed, tmp_path):
    """check_cache (what decides which writers get engines) against the answers the
    engines stored: every request answered, then one dialogue answer unusable (an entry
    of a newer format is a miss for the stream too), then one prompt answer gone."""
    from raypipe.generate.dialogues import DialogueWriter
    from raypipe.generate.engine import check_cache
    from raypipe.generate.pipeline import planner_args, quotas
    from raypipe.generate.prompts import PromptWriter
    from raypipe.llm.cache import ResponseCache

    out = fresh_copy(resumed.out, tmp_path / "again")
    cfg = vllm_config(*OVERRIDES)
    store = OutputStore(str(out))
    names = list(load_catalog())
    banks = {n: store.read_json(f"keywords/{n}.json")["keywords"] for n in names}
    args = planner_args(cfg, store, banks, quotas(cfg, names), 0.0)
    common = dict(llm=cfg.llm.model_dump(), cache_dir=str(out / "cache"), catalog_dirs=[],
                  run_seed=cfg.seed)  # fmt: skip

    def check():
        return check_cache(cfg, args, str(out / "cache"), DialogueWriter, {})

    assert check() == {
        "prompts": {"requests": 13, "unanswered": 0},
        "dialogue": {"requests": check()["dialogue"]["requests"], "unanswered": 0},
    }
    # The keys the writers build for a row the run plans first (index 0 or 1; chunk 0).
    row = next(r for sid, r in sorted(rows_by_id(resumed.out).items()) if int(sid[-7:]) < 2)
    (dialogue,) = DialogueWriter(**common).prepare([row])
    k = cfg.prompts_per_request
    item = {"ability": row["ability"], "chunk": 0, "indices": [0], "ids": [row["id"]],
            "chunk_keywords": [keyword_for(banks[row["ability"]], cfg.seed, row["ability"], j)
                               for j in range(k)]}  # fmt: skip
    (prompt,) = PromptWriter(negative_prompt="", **common).prepare([item])
    cache = ResponseCache(out / "cache")
    dialogue_key = request_key(request_body(cfg.llm.model, dialogue))
    prompt_key = request_key(request_body(cfg.llm.model, prompt))
    assert cache.get(dialogue_key) is not None and cache.get(prompt_key) is not None

    path = Path(cache.path(dialogue_key))
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99}))
    assert check()["prompts"] == {"requests": 13, "unanswered": 0}
    assert check()["dialogue"]["unanswered"] == 1  # listed, but no usable answer
    Path(cache.path(prompt_key)).unlink()
    assert check() == {
        "prompts": {"requests": 13, "unanswered": 1},
        "dialogue": {"requests": None, "unanswered": None},  # its prompts are not known
    }


# ---------------------------------------------------------------------------------------
# One short-lived engine (VLLMBackend) for request-level checks
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(ray_vllm, resumed):
    """The engines the jobs used, reached as the keyword banks and the writers served
    from OUT/cache reach them: VLLMBackend -> the run's EngineService actor -> Serve. No
    cache: every request is generated. The fixture deletes the engines at the end: the
    service found them running (the killed run started them), so it leaves them up."""
    from ray import serve

    from raypipe.llm.vllm import VLLMBackend
    from raypipe.llm.vllm.service import start_service

    cfg = load_config(GenerateConfig, PRESET).llm
    service = start_service(cfg)
    backend = VLLMBackend(cfg)
    backend.attach(service)
    yield backend
    stopped = ray.get(service.stop.remote())
    ray.kill(service)
    # Found running (the killed run started them): a run never deletes such engines.
    assert stopped["found_running"] and stopped["app"] in serve.status().applications
    serve.delete(stopped["app"])


def writer_requests(per_ability: int = 4) -> list:
    """Prompt and dialogue requests as the stream's writers build them (same templates,
    keys, seeds), ``per_ability`` of each for all 13 abilities."""
    requests = []
    for name, ability in load_catalog().items():
        bank = seed_bank(ability)
        for c in range(per_ability):
            kws = [keyword_for(bank, 0, name, c * 5 + p) for p in range(5)]
            key = f"prompts/{name}/{c:06d}"
            requests.append(prompt_request(ability, kws, key=key, seed=stable_seed(0, key)))
            prompt = f"(({kws[0]})), {name} photo, soft light, detailed, high quality"
            sid = f"{name}-{c}"
            requests.append(
                dialogue_request(ability, prompt, ability.questions[c % len(ability.questions)],
                                 key=f"dialogue/{sid}", seed=stable_seed(0, sid, "dialogue"))
            )  # fmt: skip
    return requests


def rates(requests, results) -> dict[str, float]:
    """Per request: a format reject (any of its rows rejected for its shape), cut at
    max_tokens, or accepted with content checks passing."""
    n, fmt, cut = len(requests), 0, 0
    for req, res in zip(requests, results):
        if res.finish_reason == "length":
            cut += 1
            continue
        if req.task == "prompts":
            kws = req.params["keywords"]
            parsed = (structured.parse_prompts_json if req.response_schema else parse_prompts)(
                res.text, kws
            )
            reasons = [p.reason for p in parsed if p.reason]
        else:
            fn = structured.parse_dialogue_json if req.response_schema else parse_dialogue
            reasons = [fn(res.text, req.params["prompt"], req.params["keyword"]).reason] or []
            reasons = [r for r in reasons if r]
        fmt += any(structured.is_format_reason(r) for r in reasons)
    return {"requests": n, "format_reject_rate": fmt / n, "max_tokens_rate": cut / n}


def test_structured_output_keeps_format_rejects_and_cuts_under_2_percent(engine):
    plain = writer_requests()
    constrained = [structured.with_schema(r) for r in plain]
    on = rates(constrained, engine.complete_batch(constrained))
    off = rates(plain, engine.complete_batch(plain))
    print("structured output on:", json.dumps(on), "| off:", json.dumps(off))
    assert on["requests"] >= 100
    assert on["format_reject_rate"] <= 0.02 and on["max_tokens_rate"] <= 0.02, on


def test_fixed_seed_answers_repeat_within_and_across_batches(engine):
    """What vLLM's CPU build gives for a fixed per-request seed (checked here, so a
    change shows): the same request and seed give the same text again, alone, and among
    other requests in another order (float32, eager, one engine; seen 16 of 16 each).
    So a fresh run with the same seeds writes the same answers whatever its batches held,
    on this build; GPU kernels are not batch-invariant, and there only the cache makes a
    re-run exact."""
    requests = [structured.with_schema(r) for r in writer_requests(per_ability=1)][:16]
    first = [r.text for r in engine.complete_batch(requests)]
    again = [r.text for r in engine.complete_batch(requests)]
    alone = [engine.complete_batch([r])[0].text for r in requests[:4]]
    reordered = [r.text for r in engine.complete_batch(requests[::-1])][::-1]
    assert first == again
    assert alone == first[:4]
    assert reordered == first
    # All those batches went to the engines the jobs used: found up, none started.
    stats = ray.get(engine._service.stats.remote())
    assert stats["found_running"] and stats["engines_started"] == 0, stats


def test_benchmark_item_writer_writes_items_of_each_type_on_the_engine(engine):
    """The benchmark-item writer (what ``jobs/evaluate.py build`` runs in place of the
    dialogue writer) on vLLM, as the stream runs a writer served from OUT/cache: the
    CacheServed stage, its requests (structured, as in demo-vllm) going to the engine.
    Each row comes out as an item of its drawn question type (question with
    ``<image>``, response, answer keywords) or rejected at ``benchmark`` with a reason;
    structured output leaves no format reject and no answer cut at max_tokens."""
    from raypipe.generate.dialogues import BenchmarkItemWriter, question_type_for
    from raypipe.generate.engine import CacheServed
    from raypipe.schema import rows_to_table

    cfg = vllm_config()
    assert cfg.llm.structured_output
    mix = {"yes_no": 1.0, "wh": 1.0, "either_or": 1.0}
    rows = []
    for name, ability in load_catalog().items():
        bank = seed_bank(ability)
        for i in range(3):
            kw = keyword_for(bank, 0, name, i)
            prompt = f"(({kw})), {name} photo, soft light, detailed, high quality"
            rows.append({"id": f"bench-{name}-{i}", "ability": name, "index": i,
                         "keywords": [kw], "prompt": prompt, "seed": i})  # fmt: skip
    writer_kwargs = dict(llm=cfg.llm.model_dump(), cache_dir=None, catalog_dirs=[],
                         run_seed=1000, question_mix=mix)  # fmt: skip
    stage = CacheServed(BenchmarkItemWriter, writer_kwargs, service=engine._service)
    out = stage(rows_to_table(rows)).to_pylist()

    assert [r["id"] for r in out] == [r["id"] for r in rows]
    items = [r for r in out if not r["reject_stage"]]
    rejected = [r for r in out if r["reject_stage"]]
    reasons = Counter(r["reject_reason"] for r in rejected)
    print(f"benchmark items on vLLM: {len(items)} of {len(out)}; rejects {dict(reasons)}")
    assert {r["reject_stage"] for r in rejected} <= {"benchmark"}
    assert all(r["reject_reason"] for r in rejected)
    assert not [r for r in rejected if structured.is_format_reason(r["reject_reason"])], reasons
    assert reasons["max_tokens"] == 0, reasons
    assert items, reasons
    for r in items:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"].strip()
        assert r["question_type"] in mix and r["answer_keywords"]
    # Each row's question type is drawn from the mix by its id, whatever the engine wrote.
    drawn = {r["id"]: question_type_for(mix, 1000, r["id"]) for r in rows}
    assert set(drawn.values()) == set(mix)
    assert all(r["question_type"] == drawn[r["id"]] for r in items)
    usage = [json.loads(r["meta"])["llm"]["benchmark"] for r in out if r["meta"]]
    assert usage and all(u["completion_tokens"] > 0 for u in usage)


def test_an_engine_that_dies_is_a_model_error_that_says_what_to_do(engine):
    """Last of the engine's tests: it kills the engine's replica while a request is on it
    (vLLM's own death kills the process the same way), and the request fails with a
    ModelError, not Ray's. Serve then replaces the engine (the session's second start)."""
    import threading

    (replica,) = [a for a in engine_replicas() if a["State"] == "ALIVE"]
    requests = [structured.with_schema(r) for r in writer_requests(per_ability=1)]
    engine.complete_batch(requests[:1])  # the handle is up: what follows hits the engine
    killer = threading.Timer(
        1.0, lambda: ray.kill(ray.get_actor(replica["Name"], namespace="serve"))
    )
    killer.start()
    with pytest.raises(ModelError) as info:
        for _ in range(50):  # batches until the kill lands on one
            engine.complete_batch(requests)
    killer.join()
    message = str(info.value)
    assert "vLLM engine for llm.model='raypipe-tiny/tiny-chat-llm' died" in message
    assert "ActorDiedError" in message or "ActorUnavailableError" in message, message
    assert "llm.vllm.gpu_memory_utilization" in message and "run the same command" in message


# ---------------------------------------------------------------------------------------
# An engine dying under the stream (no engine started: a stand-in actor of the engine
# deployment's class dies as a replica does when its vLLM engine dies)
# ---------------------------------------------------------------------------------------


class EngineServer:
    """Dies on the call, as an engine replica does (``os._exit``) when vLLM's dies."""

    def generate(self, x):
        os._exit(1)


class CallsTheEngine:
    """A stream stage that sends its third block to the engine, as Ray Data LLM's serve
    stage sends rows to the replicas."""

    def __init__(self):
        self.engine = ray.remote(EngineServer).options(num_cpus=0, max_restarts=0).remote()

    def __call__(self, batch):
        if batch["id"][0] >= 2:
            ray.get(self.engine.generate.remote(batch))
        return batch


class RenderStage:
    """A death in an actor that holds no engine."""

    def __call__(self, batch):
        if batch["id"][0] >= 2:
            os._exit(1)
        return batch


def stream_failure(ray, stage: type) -> BaseException:
    # Ray's workers cannot import this test module: its classes travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = ray.data.range(6, override_num_blocks=6).map_batches(
        stage,
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=0.1,
        max_restarts=0,  # a stage that dies stays dead (Ray Data restarts its actors)
        max_task_retries=0,
    )
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever Ray raises
        for _ in ds.iter_batches(batch_size=None):
            pass
    assert "No module named" not in str(info.value)  # it died where it should, in a call
    return info.value


def test_engine_dying_under_the_stream_is_a_model_error_that_says_what_to_do(ray_vllm):
    cfg = vllm_config().llm
    died = stream_failure(ray_vllm, CallsTheEngine)
    error = engine_failure(died, cfg)  # what the stream raises instead (pipeline.stream)
    assert isinstance(error, ModelError), repr(died)
    message = str(error)
    assert "vLLM engine for llm.model='raypipe-tiny/tiny-chat-llm' died (ActorDiedError" in (
        message
    )
    assert "llm.vllm.gpu_memory_utilization" in message and "run the same command" in message
    # Another actor's death is not blamed on the engines.
    assert engine_failure(stream_failure(ray_vllm, RenderStage), cfg) is None


def test_a_writer_on_the_engines_lands_in_the_ray_data_plan(ray_vllm, tiny_dir):
    """Request half -> Ray Data LLM's serve stage -> answer half, each with the LLM
    stages' own placement (llm_actor_cpus, llm_actor_resources); the engines themselves
    are the Serve application's (tests/test_vllm_placement.py)."""
    from raypipe.generate.engine import add_vllm_writer
    from raypipe.generate.prompts import PromptWriter

    cfg = vllm_config("llm_actor_resources={api_slot: 1}")
    ds = add_vllm_writer(
        ray_vllm.data.from_items([{"x": 1}]), PromptWriter, cfg, app="raypipe-vllm-test",
        negative_prompt="", llm=cfg.llm.model_dump(), cache_dir=None, catalog_dirs=[],
        run_seed=0,
    )  # fmt: skip
    stages, sizes, op = {}, {}, ds._logical_plan.dag
    while op is not None:
        if hasattr(op, "ray_remote_args"):
            stages[op.name] = op.ray_remote_args
            sizes[op.name] = getattr(op, "batch_size", None)
        op = op.input_dependencies[0] if op.input_dependencies else None
    # The serve stage as Ray Data LLM builds it: the configured batch size, nothing edited
    # (its actors take Ray Data's default CPU, which local_cpus counts).
    serve_stage = stages["MapBatches(ServeDeploymentStageUDF)"]
    assert sizes["MapBatches(ServeDeploymentStageUDF)"] == cfg.llm.vllm.batch_size > 1
    assert "num_cpus" not in serve_stage and "num_gpus" not in serve_stage
    for half in ("MapBatches(EngineRequests)", "MapBatches(EngineAnswers)"):
        assert stages[half]["resources"] == {"api_slot": 1.0}, half
        assert stages[half]["num_cpus"] == cfg.llm_actor_cpus
    # Without the application: one stage served from OUT/cache, no engine stage.
    cached = add_vllm_writer(
        ray_vllm.data.from_items([{"x": 1}]), PromptWriter, cfg, service=None,
        negative_prompt="", llm=cfg.llm.model_dump(), cache_dir=None, catalog_dirs=[],
        run_seed=0,
    )  # fmt: skip
    assert cached._logical_plan.dag.name == "MapBatches(CacheServed)"


# ---------------------------------------------------------------------------------------
# Fail fast: before any engine or render actor starts
# ---------------------------------------------------------------------------------------


def vllm_config(*overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, PRESET, ["log_to_driver=false", *overrides])


def test_missing_model_fails_in_seconds_before_any_rendering(tiny_dir, tmp_path):
    start = time.time()
    with pytest.raises(ModelError, match="llm.model='nobody/no-such-model'"):
        generate(vllm_config("llm.model=nobody/no-such-model"), str(tmp_path))
    assert time.time() - start < 30
    assert not data_parts(tmp_path)


def test_model_the_cpu_engine_cannot_run_fails_before_any_engine_starts(tiny_dir, tmp_path):
    # The project's tiny Llama has heads of 16: vLLM's CPU attention refuses them.
    with pytest.raises(ModelError, match="heads of size 16"):
        cfg = vllm_config("llm.model=raypipe-tiny/tiny-llama", "llm.vllm.max_model_len=512")
        generate(cfg, str(tmp_path))
    assert not (tmp_path / "data").exists() or not data_parts(tmp_path)


def test_engines_that_cannot_start_fail_the_run_before_any_rendering(ray_vllm, tmp_path):
    """Engines whose start fails (an engine argument vLLM does not take: the replica
    fails as soon as it has imported vLLM, before loading any model) fail the run after
    ``engine_restarts + 1`` tries, with what to do, before any row is rendered; the
    failed application is removed."""
    from ray import serve

    cfg = vllm_config(
        "llm.vllm.engine_kwargs={no_such_engine_argument: 1}", "llm.vllm.engine_restarts=0"
    )
    with pytest.raises(ModelError, match="could not start") as info:
        generate(cfg, str(tmp_path))
    message = str(info.value)
    assert "tried once" in message and "no_such_engine_argument" in message, message
    assert "llm.vllm.gpu_memory_utilization" in message and "run again" in message
    assert not data_parts(tmp_path)
    assert service_name(cfg.llm) not in serve.status().applications


def test_an_engine_without_memory_for_its_kv_cache_fails_with_the_engines_own_error(
    ray_vllm, tmp_path
):
    """vLLM's engine core (a child process of the replica) only logs why it failed;
    the replica reads that line back, so the run's error quotes it instead of pointing at
    the worker log. Here: a share of memory too small for the KV cache."""
    from ray import serve

    cfg = vllm_config("llm.vllm.gpu_memory_utilization=0.0001", "llm.vllm.engine_restarts=0")
    with pytest.raises(ModelError, match="could not start") as info:
        generate(cfg, str(tmp_path))
    message = str(info.value)
    print(message)
    # vLLM's line: "Available memory on node 0 (.../... GiB) on kv cache allocation is
    # less than requested memory for kv (-0.71/0.0 GiB) ..." (its type differs by version).
    own = message.split("The engine's own error: ", 1)[-1]
    assert "on kv cache allocation is less than requested memory for kv" in own, message
    assert "raise llm.vllm.gpu_memory_utilization" in message
    assert not data_parts(tmp_path)
    assert service_name(cfg.llm) not in serve.status().applications


def test_model_without_a_chat_template_is_refused(tiny_dir, tmp_path):
    from raypipe.tiny import resolve_tiny

    model = tmp_path / "no-chat"
    shutil.copytree(resolve_tiny("raypipe-tiny/tiny-chat-llm"), model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a chat model"):
        generate(vllm_config(f"llm.model={model}"), str(tmp_path / "out"))


def test_the_session_started_at_most_two_engines(ray_vllm):
    """Last: the engine starts of this session, from Ray's actor table (every replica of
    an engine application, dead or alive): the killed run's, and Serve's replacement of
    the engine the death test killed."""
    replicas = engine_replicas()
    print(f"engine starts this session: {len(replicas)}")
    assert len(replicas) <= 2, [(a["Name"], a["State"]) for a in replicas]
