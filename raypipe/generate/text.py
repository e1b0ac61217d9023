"""LLM writing stages: keyword banks, SD prompts and dialogues (paper section 4).

Each stage builds its LLM backend once in ``__init__`` and is a pure
``__call__(batch: pyarrow.Table) -> pyarrow.Table`` over work rows (raypipe.schema).
A request that fails after retries, or whose text does not parse, rejects the rows it
was for, with the reason and the raw text; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pyarrow as pa

from raypipe.abilities import Ability, load_catalog
from raypipe.generate.stage import Stage
from raypipe.llm import make_backend, tasks
from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.config import LLMConfig
from raypipe.llm.failures import FATAL, LLMFatalError, fatal_message
from raypipe.llm.tasks import (
    benchmark_request,
    dialogue_request,
    keyword_request,
    parse_benchmark,
    parse_dialogue,
    parse_keywords,
    parse_prompts,
    prompt_request,
)
from raypipe.matching import emphasized_keywords
from raypipe.schema import is_rejected, reject, row_seed, rows_to_table, update_meta

#: Stage of rows handed back unmade at ``max_usd`` (see raypipe.generate.planner).
UNMADE = "unmade"


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (LLM APIs take small ints)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big") >> 1


def usage_meta(result: LLMResult, share: int = 1) -> dict[str, Any]:
    """A request's tokens and cost, split over the ``share`` rows it served in this call.

    ``prompt_tokens``, ``completion_tokens`` and ``cost_usd`` are what was paid; an answer
    served from the cache (or by an identical request in flight) pays nothing and
    counts what it served as ``cached_*``.
    """
    return {
        "prompt_tokens": result.prompt_tokens / share,
        "completion_tokens": result.completion_tokens / share,
        "cost_usd": result.cost_usd / share,
        "cached_prompt_tokens": result.cached_prompt_tokens / share,
        "cached_completion_tokens": result.cached_completion_tokens / share,
        "cached": result.cached,
        "attempts": result.attempts,
        "latency_s": result.latency_s,
    }


def add_usage(row: dict[str, Any], stage: str, usage: dict[str, Any]) -> None:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    llm = meta.setdefault("llm", {})
    llm[stage] = usage
    row["meta"] = json.dumps(meta, sort_keys=True)


# ------------------------------------------------------------------------------------
# 1. Keyword banks (driver side, once per ability, saved in OUT/keywords)
# ------------------------------------------------------------------------------------


def seed_bank(ability: Ability) -> list[str]:
    return list(dict.fromkeys(k.strip().lower() for k in ability.keywords))


def expand_keyword_bank(
    ability: Ability,
    backend,
    extra: int,
    seed: int,
    temperature: float,
    per_request: int = 50,
    start: list[str] | None = None,
    attempt: int = 0,
    llm: LLMConfig | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Seed keywords plus ``extra`` LLM-listed ones (paper section 4.3).

    Returns (bank, rejects). Requests continue until ``extra`` new keywords are in the
    bank or a few rounds in a row add nothing. ``start`` is a bank an earlier run left
    short; ``attempt`` (its retry number) goes into the request keys, so a retry sends
    new requests instead of being served the answers that fell short. With
    ``llm`` (the run's LLM settings) the requests get their completion limit capped
    and, under structured output, a JSON schema (:func:`raypipe.llm.tasks.for_run`).
    """
    bank = list(start) if start else seed_bank(ability)
    rejects: list[dict[str, Any]] = []
    target, stale, round_ = len(seed_bank(ability)) + extra, 0, 0
    while len(bank) < target and stale < 3:
        n = min(per_request, target - len(bank))
        retry = f"a{attempt}/" if attempt else ""
        key = f"keywords/{ability.name}/{retry}{round_:04d}"
        req = keyword_request(
            ability, n, list(bank), key=key, seed=stable_seed(seed, key), temperature=temperature
        )
        if llm is not None:
            req = tasks.for_run(req, llm)
        (res,) = backend.complete_batch([req])
        stop_if_fatal([res], backend)
        round_ += 1
        if not res.ok or res.finish_reason == "length":
            reason = f"llm_error:{res.error}" if not res.ok else "max_tokens"
            rejects.append(_keyword_reject(key, ability.name, reason, res.text or ""))
            stale += 1
            continue
        if req.response_schema:
            parsed = tasks.parse_keywords_json(res.text, ability, existing=bank)
        else:
            parsed = parse_keywords(res.text, ability, existing=bank)
        for reason, raw in parsed.rejects:
            rejects.append(_keyword_reject(key, ability.name, reason, raw))
        new = [k for k in parsed.items if k not in bank]
        bank.extend(new[: target - len(bank)])
        stale = 0 if new else stale + 1
    return bank, rejects


def stop_if_fatal(results: list[LLMResult], backend=None) -> None:
    """A fatal failure (the endpoint refused the key, the model, a parameter) stops the
    run at once, with the server's message, instead of rejecting rows one by one. The
    job's limiter hears of it first (the driver reads the message there: Ray Data does
    not carry an actor's exception type back)."""
    for res in results:
        if res.failure == FATAL:
            if hasattr(backend, "flush_reports"):
                backend.flush_reports()
            raise LLMFatalError(fatal_message(res.error or "no message"))


def _keyword_reject(key: str, ability: str, reason: str, raw: str) -> dict[str, Any]:
    return {"id": key, "ability": ability, "stage": "keywords", "reason": reason, "raw": raw or ""}


def keyword_for(bank: list[str], run_seed: int, ability: str, index: int) -> str:
    """The keyword of row ``index``: walks a seeded permutation of the bank, so the
    keywords spread evenly and a row's keyword never depends on which rows exist."""
    perm = list(range(len(bank)))
    random.Random(stable_seed(run_seed, ability, "keywords")).shuffle(perm)
    cycle, pos = divmod(index, len(bank))
    if cycle:  # a new order on every pass through the bank
        random.Random(stable_seed(run_seed, ability, "keywords", cycle)).shuffle(perm)
    return bank[perm[pos]]


class LLMStage(Stage):
    """Base of the LLM writing stages: the backend and catalog, built once per actor.

    The backend reads the API key on the actor's node (``llm.api_key_env`` or
    ``llm.api_key_file``): it is never an argument. ``limiter`` is the job-wide limiter
    shared by every LLM client of the run; ``planner`` the run's planner, told what each
    batch paid (for ``max_usd``).
    """

    def __init__(
        self,
        llm: dict,
        cache_dir: str | None,
        catalog_dirs: list[str],
        run_seed: int,
        limiter=None,
        planner=None,
    ):
        self.cfg = LLMConfig.model_validate(llm)
        self.catalog = load_catalog(catalog_dirs or None)
        self.backend = make_backend(self.cfg, cache_dir, self.catalog, limiter=limiter)
        self.run_seed = run_seed
        self.planner = planner

    # A writing stage is two halves: ``prepare`` (rows -> one request per row, or None for
    # a row that needs none) and ``finish`` (rows, requests, results -> output table).
    # ``process`` joins them through ``self.backend``; the ``vllm`` backend runs them as
    # two stages with the Ray Data LLM engine between (raypipe.generate.engine).

    def prepare(self, rows: list[dict[str, Any]]) -> list[LLMRequest | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def finish(
        self,
        rows: list[dict[str, Any]],
        requests: list[LLMRequest | None],
        results: list[LLMResult | None],
    ) -> pa.Table:
        raise NotImplementedError  # pragma: no cover - abstract

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests = self.prepare(rows)
        answers = iter(self.complete([r for r in requests if r is not None]))
        return self.finish(rows, requests, [None if r is None else next(answers) for r in requests])

    def request(self, req: LLMRequest) -> LLMRequest:
        """``req`` as this run sends it: its completion limit capped by ``llm.max_tokens``,
        with its JSON schema under ``llm.structured_output`` (:func:`tasks.for_run`)."""
        return tasks.for_run(req, self.cfg)

    @staticmethod
    def failure(res: LLMResult) -> str | None:
        """Why ``res`` cannot be used at all (failed, or cut at max_tokens), else None."""
        if not res.ok:
            return f"llm_error:{res.error}"
        if res.finish_reason == "length":
            return "max_tokens"
        return None

    def writable(self, rows: list[dict[str, Any]]) -> list[bool]:
        """Which rows to write: not yet rejected; at ``max_usd`` none (they are handed
        back unmade, in place)."""
        todo = [not is_rejected(r) for r in rows]
        if any(todo) and self.over_budget():
            for r, t in zip(rows, todo):
                if t:
                    reject(r, UNMADE, "max_usd", "")
            todo = [False] * len(rows)
        return todo

    def over_budget(self) -> bool:
        """Whether the run reached ``max_usd`` (then rows are handed back unmade)."""
        if self.planner is None:
            return False
        import ray

        return ray.get(self.planner.over_budget.remote())

    def complete(self, requests: list) -> list[LLMResult]:
        """Answer ``requests``; tell the planner what they paid."""
        results = self.backend.complete_batch(requests) if requests else []
        stop_if_fatal(results, self.backend)
        paid = sum(r.cost_usd for r in results)
        if self.planner is not None and paid:
            import ray

            ray.get(self.planner.spend.remote(paid))
        return results


# ------------------------------------------------------------------------------------
# 2. SD prompt writing (an actor pool of LLM clients, k prompts per request)
# ------------------------------------------------------------------------------------


class PromptWriter(LLMStage):
    """Writes one SD prompt per planned row, k rows per LLM request.

    Input: one item per request chunk: ``ability``, ``chunk``, ``indices`` (the rows of the
    chunk to make now), ``chunk_keywords`` (all k keywords of the chunk, so the request
    is identical whichever of its rows are asked for: later rows of the chunk and
    re-runs hit the cache), ``ids``.
    Output: work rows (raypipe.schema.WORK_SCHEMA) with id, ability, index, seed,
    keywords, prompt, negative_prompt, llm_model and meta filled, or rejected with
    stage ``prompts``. Positions of the answer that failed are *burned* with the planner,
    so no replacement row is ever planned onto an answer that already failed. A request
    counts its whole cost against the rows it served in this call.
    """

    INPUT_COLUMNS = ("ability", "chunk", "indices", "ids", "chunk_keywords")
    OUTPUT_COLUMNS = (
        "id",
        "ability",
        "index",
        "seed",
        "keywords",
        "prompt",
        "negative_prompt",
        "llm_model",
        "meta",
    )

    def __init__(self, *, negative_prompt: str, **llm_stage_kwargs: Any):
        super().__init__(**llm_stage_kwargs)
        self.negative_prompt = negative_prompt

    def prepare(self, items: list[dict[str, Any]]) -> list[LLMRequest | None]:
        if self.over_budget():
            for it in items:
                it["unmade"] = True
            return [None] * len(items)
        requests: list[LLMRequest | None] = []
        for it in items:
            key = f"prompts/{it['ability']}/{it['chunk']:06d}"
            requests.append(
                self.request(
                    prompt_request(
                        self.catalog[it["ability"]],
                        list(it["chunk_keywords"]),
                        key=key,
                        seed=stable_seed(self.run_seed, key),
                        temperature=self.cfg.temperature,
                    )
                )
            )
        return requests

    def finish(self, items, requests, results) -> pa.Table:
        if any(it.get("unmade") for it in items):
            return self.unmade(items)
        rows: list[dict[str, Any]] = []
        for it, req, res in zip(items, requests, results):
            k = len(it["chunk_keywords"])
            failure = self.failure(res)
            if failure is not None:
                parsed = None
            elif req.response_schema:
                parsed = tasks.parse_prompts_json(res.text, list(it["chunk_keywords"]))
            else:
                parsed = parse_prompts(res.text, list(it["chunk_keywords"]))
            failed = [p for p in range(k) if parsed is None or parsed[p].reason]
            if failed and self.planner is not None:
                import ray

                ray.get(
                    self.planner.burn.remote(it["ability"], [it["chunk"] * k + p for p in failed])
                )
            for index, sid in zip(it["indices"], it["ids"]):
                pos = index % k
                row = {
                    "id": sid,
                    "ability": it["ability"],
                    "index": index,
                    "seed": row_seed(sid),
                    "keywords": [it["chunk_keywords"][pos]],
                    "negative_prompt": self.negative_prompt,
                    "llm_model": self.backend.model,
                    "meta": "{}",
                }
                add_usage(row, "prompts", usage_meta(res, share=len(it["indices"])))
                if failure is not None:
                    reject(row, "prompts", failure, res.text or "")
                elif parsed[pos].reason:
                    reject(row, "prompts", parsed[pos].reason, parsed[pos].raw or res.text)
                else:
                    row["prompt"] = parsed[pos].prompt
                    row["keywords"] = emphasized_keywords(parsed[pos].prompt) or row["keywords"]
                rows.append(row)
        return rows_to_table(rows)

    def unmade(self, items: list[dict[str, Any]]) -> pa.Table:
        rows = []
        for it in items:
            for index, sid in zip(it["indices"], it["ids"]):
                row = {"id": sid, "ability": it["ability"], "index": index, "meta": "{}"}
                rows.append(reject(row, UNMADE, "max_usd", ""))
        return rows_to_table(rows)


# ------------------------------------------------------------------------------------
# 3. Dialogue writing (grounded in the same prompt)
# ------------------------------------------------------------------------------------


class DialogueWriter(LLMStage):
    """Writes the answer to a question drawn from the ability's question pool.

    Input: work rows with id, ability, prompt, keywords, seed. Output: conversations
    (LLaVA format; the human turn starts ``<image>\\n``), question_type, answer_keywords
    and meta; or rejected with stage ``dialogue``. Already-rejected rows pass through.
    """

    INPUT_COLUMNS = ("id", "ability", "prompt", "keywords", "seed")
    OUTPUT_COLUMNS = ("conversations", "question_type", "answer_keywords", "meta")

    def question_for(self, ability: Ability, sample_id: str) -> str:
        pool = ability.questions
        return pool[stable_seed(self.run_seed, sample_id, "question") % len(pool)]

    def prepare(self, rows: list[dict[str, Any]]) -> list[LLMRequest | None]:
        requests: list[LLMRequest | None] = []
        for r, todo in zip(rows, self.writable(rows)):
            if not todo:
                requests.append(None)
                continue
            ability = self.catalog[r["ability"]]
            requests.append(
                self.request(
                    dialogue_request(
                        ability,
                        r["prompt"],
                        self.question_for(ability, r["id"]),
                        key=f"dialogue/{r['id']}",
                        seed=stable_seed(self.run_seed, r["id"], "dialogue"),
                        temperature=self.cfg.temperature,
                    )
                )
            )
        return requests

    def finish(self, rows, requests, results) -> pa.Table:
        for r, req, res in zip(rows, requests, results):
            if req is None:
                continue
            question = req.params["question"]
            add_usage(r, "dialogue", usage_meta(res))
            failure = self.failure(res)
            if failure is not None:
                reject(r, "dialogue", failure, res.text or "")
                continue
            keyword = (r["keywords"] or [""])[0]
            if req.response_schema:
                parsed = tasks.parse_dialogue_json(res.text, r["prompt"], keyword)
            else:
                parsed = parse_dialogue(res.text, r["prompt"], keyword)
            if parsed.reason:
                reject(r, "dialogue", parsed.reason, res.text)
                continue
            r["conversations"] = [
                {"from": "human", "value": "<image>\n" + question},
                {"from": "gpt", "value": parsed.description},
            ]
            r["question_type"] = self.catalog[r["ability"]].question_type
            r["answer_keywords"] = []
            update_meta(r, question=question)
        return rows_to_table(rows)


def question_type_for(mix: dict[str, float], run_seed: int, sample_id: str) -> str:
    """The question type of a benchmark row: drawn from ``mix`` (type -> weight) by a
    hash of the run seed and the row id, so a re-run asks the same type."""
    names = sorted(t for t, w in mix.items() if w > 0)
    total = sum(mix[t] for t in names)
    x = stable_seed(run_seed, sample_id, "question_type") / 2**31 * total
    for name in names:
        x -= mix[name]
        if x < 0:
            return name
    return names[-1]


class BenchmarkItemWriter(LLMStage):
    """Writes a benchmark item per row instead of a training dialogue (paper Fig. 5):
    a question of the row's type (``question_mix``: yes/no, wh, either-or), the
    reference response, and reference answer keywords (several where answers vary).

    Input: work rows with id, ability, prompt, keywords. Output: conversations (the
    question with ``<image>``, the reference response), question_type, answer_keywords
    and meta; or rejected with stage ``benchmark`` and the parse reason. Already-rejected
    rows pass through. The offline backend answers with exact reference items.
    """

    INPUT_COLUMNS = ("id", "ability", "prompt", "keywords", "seed")
    OUTPUT_COLUMNS = ("conversations", "question_type", "answer_keywords", "meta")

    def __init__(self, *args, question_mix: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.question_mix = question_mix

    def prepare(self, rows: list[dict[str, Any]]) -> list[LLMRequest | None]:
        requests: list[LLMRequest | None] = []
        for r, todo in zip(rows, self.writable(rows)):
            if not todo:
                requests.append(None)
                continue
            qtype = question_type_for(self.question_mix, self.run_seed, r["id"])
            requests.append(
                self.request(
                    benchmark_request(
                        self.catalog[r["ability"]],
                        r["prompt"],
                        qtype,
                        key=f"benchmark/{r['id']}",
                        seed=stable_seed(self.run_seed, r["id"], "benchmark"),
                        temperature=self.cfg.temperature,
                    )
                )
            )
        return requests

    def finish(self, rows, requests, results) -> pa.Table:
        for r, req, res in zip(rows, requests, results):
            if req is None:
                continue
            qtype = req.params["question_type"]
            add_usage(r, "benchmark", usage_meta(res))
            failure = self.failure(res)
            if failure is not None:
                reject(r, "benchmark", failure, res.text or "")
                continue
            if req.response_schema:
                parsed = tasks.parse_benchmark_json(res.text, qtype)
            else:
                parsed = parse_benchmark(res.text, qtype)
            if parsed.reason:
                reject(r, "benchmark", parsed.reason, res.text or "")
                continue
            r["conversations"] = [
                {"from": "human", "value": "<image>\n" + parsed.question},
                {"from": "gpt", "value": parsed.answer},
            ]
            r["question_type"] = qtype
            r["answer_keywords"] = list(parsed.answer_keywords)
            update_meta(r, question=parsed.question)
        return rows_to_table(rows)
