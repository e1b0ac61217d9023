"""Dialogue writing, grounded in the same prompt (paper section 4.2), and benchmark
items in its place for the evaluation set (paper Fig. 5)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raypipe.abilities import Ability
from raypipe.generate.llm_stage import (
    LLMStage,
    add_usage,
    stable_seed,
    usage_meta,
)
from raypipe.llm import tasks
from raypipe.llm.base import LLMRequest
from raypipe.llm.tasks import (
    benchmark_request,
    dialogue_request,
    parse_benchmark,
    parse_dialogue,
)
from raypipe.schema import reject, rows_to_table, update_meta


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
                if not self.hand_back(r, res):
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
                if not self.hand_back(r, res):
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
