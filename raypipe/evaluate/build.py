"""Building a synthetic benchmark through the generation pipeline (paper section 5, Fig. 5).

:func:`build_benchmark` runs the generation job with ``benchmark_question_mix`` set: the
same planner, prompt writer, dedup, SD render pool and quality checks as training
data, but the dialogue stage is :class:`raypipe.generate.dialogues.BenchmarkItemWriter`,
which writes a yes/no, wh- or either-or question per image with its reference response
and answer keywords. The generation run lives in ``BENCH/generation`` (a normal OUT:
resumable, with its manifest, rejects and cache). Its samples become benchmark items,
the overlap filter (:func:`raypipe.evaluate.overlap.overlap_filter`) drops those that
overlap the training data, and the benchmark folder gets ``per_ability`` items per
ability, lowest ids first.

Every item must score its own answer before it enters the benchmark (:func:`self_score`):
its reference response, scored against its own keywords, must be correct, and a yes/no
item's first keyword must be "yes" or "no" and the answer its response gives. An item
that fails is dropped into the benchmark's rejects (stage ``self_score``) with the
reason, and counts as missing for its ability like an overlapping one.

When the filter leaves an ability short, the generation run is asked for more rows
(the same command resumes it, so nothing made is made again), up to ``max_attempts``
rounds; the report says how many items each ability got and how many were dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from raypipe import storage
from raypipe.evaluate.items import OVERLAP_STAGE
from raypipe.generate.config import GenerateConfig

#: Rejects ``stage`` of generated items that do not score their own answer.
SELF_SCORE_STAGE = "self_score"

#: The default question mix: the paper's three question types, equally often.
DEFAULT_MIX = {"yes_no": 1.0, "wh": 1.0, "either_or": 1.0}


def build_benchmark(
    cfg: GenerateConfig,
    out: str,
    per_ability: int = 50,
    training: list[str] | tuple[str, ...] = (),
    *,
    benchmark: str = "synthetic",
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Build ``out`` (a benchmark folder) with ``per_ability`` items per ability; returns
    its report. ``training``: raypipe data locations whose prompts the items must not
    overlap."""
    from raypipe.abilities import load_catalog
    from raypipe.evaluate.items import write_benchmark
    from raypipe.evaluate.overlap import read_training_prompts
    from raypipe.generate.pipeline import generate

    mix = dict(cfg.benchmark_question_mix or DEFAULT_MIX)
    abilities = list(load_catalog(cfg.catalog_dirs or None, names=cfg.abilities))
    train_rows = read_training_prompts(list(training)) if training else None
    gen_out = storage.join(out, "generation")
    extra, attempts, kept, dropped = 0, [], [], []
    for attempt in range(1, max_attempts + 1):
        want = per_ability + extra
        run = cfg.model_copy(
            update={"num_samples": want * len(abilities), "benchmark_question_mix": mix}
        )
        manifest = generate(run, gen_out)
        kept, dropped = _accepted_items(gen_out, abilities, benchmark, train_rows)
        have = Counter(i["ability"] for i in kept)
        short = {a: per_ability - have[a] for a in abilities if have[a] < per_ability}
        attempts.append(
            {
                "attempt": attempt,
                "rows_per_ability": want,
                "accepted": manifest.get("accepted"),
                "dropped_by_overlap": sum(r["stage"] == OVERLAP_STAGE for r in dropped),
                "dropped_by_self_score": sum(r["stage"] == SELF_SCORE_STAGE for r in dropped),
                "short": short,
            }
        )
        if not short:
            break
        extra += max(short.values())
    chosen: list[dict] = []
    for ability in abilities:
        mine = sorted((i for i in kept if i["ability"] == ability), key=lambda i: i["id"])
        chosen += mine[:per_ability]
    got = Counter(i["ability"] for i in chosen)
    report = {
        "benchmark": benchmark,
        "per_ability": per_ability,
        "question_mix": mix,
        "items": len(chosen),
        "items_per_ability": {a: got[a] for a in abilities},
        "short_abilities": {a: per_ability - got[a] for a in abilities if got[a] < per_ability},
        "question_types": dict(Counter(i["question_type"] for i in chosen)),
        **_drop_counts(dropped),
        "training_sources": list(training),
        "generation": gen_out,
        "attempts": attempts,
    }
    write_benchmark(out, chosen, dropped, report, benchmark=benchmark, overwrite=True)
    return report


def _accepted_items(
    gen_out: str, abilities: list[str], benchmark: str, train_rows
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The generation run's samples as items: ``(kept, rejects)`` after the self-score
    and (with ``train_rows``) the overlap filter."""
    from raypipe.evaluate.items import items_from_samples
    from raypipe.evaluate.overlap import overlap_filter
    from raypipe.generate.store import OutputStore

    columns = ["id", "ability", "image", "prompt", "conversations", "question_type"]
    columns += ["answer_keywords", "sd_model", "llm_model", "seed"]
    samples = OutputStore(gen_out).read_columns("data", columns)
    items = items_from_samples(samples, benchmark, _banks(gen_out, abilities)).to_pylist()
    items, unscorable = self_score(items, _responses(samples))
    if train_rows is None:
        return items, unscorable
    kept, overlapping = overlap_filter(items, train_rows)
    return kept, unscorable + overlapping


def _drop_counts(dropped: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, name in ((OVERLAP_STAGE, "overlap"), (SELF_SCORE_STAGE, "self_score")):
        reasons = Counter(r["reason"] for r in dropped if r["stage"] == stage)
        out[f"{name}_dropped"] = sum(reasons.values())
        out[f"{name}_reasons"] = dict(reasons)
    return out


def _responses(samples) -> dict[str, str]:
    """Each sample's reference response: its first assistant turn."""
    out = {}
    for row in samples.select(["id", "conversations"]).to_pylist():
        turns = row["conversations"] or []
        out[row["id"]] = next((t["value"] for t in turns if t["from"] == "gpt"), "")
    return out


def _banks(gen_out: str, abilities: list[str]) -> dict[str, list[str]]:
    """The generation run's keyword bank of each ability (OUT/keywords/ABILITY.json)."""
    from raypipe.generate.store import OutputStore

    store = OutputStore(gen_out)
    banks = {}
    for ability in abilities:
        saved = store.read_json(f"keywords/{ability}.json") or {}
        banks[ability] = list(saved.get("keywords") or [])
    return banks


def self_score(
    items: list[dict[str, Any]], responses: dict[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(kept, rejects)``: the items whose own reference response (``responses[id]``)
    scores correct against their keywords, and a rejects row (stage ``self_score``) for
    each other one, its reason:

    - ``yes_no_keyword``: a yes/no item whose first keyword is not "yes" or "no";
    - ``keywords_contradict_response``: a yes/no item whose first keyword is not the
      answer its response gives ("Keywords: no" for "Yes, the car is red.");
    - ``unscorable``: the scorer cannot read the item (no options in an either-or
      question, ...);
    - ``self_score:<reason>``: the response scored wrong for another reason (its keyword
      denied, two options named, ...).
    """
    from raypipe.evaluate.score import score_answer
    from raypipe.evaluate.score_yes_no import yes_no_of

    kept, rejects = [], []
    for item in items:
        response = responses.get(item["id"], "")
        keywords = [k.strip().lower() for k in item["answer_keywords"]]
        reason, detail = None, ""
        if item["question_type"] == "yes_no" and (not keywords or keywords[0] not in ("yes", "no")):
            reason = "yes_no_keyword"
        elif (
            item["question_type"] == "yes_no"
            and yes_no_of(item["question"], response) != keywords[0]
        ):
            reason = "keywords_contradict_response"
        else:
            try:
                verdict = score_answer(item, response)
            except ValueError as e:
                reason, detail = "unscorable", str(e)
            else:
                reason = None if verdict.correct else f"self_score:{verdict.reason}"
        if reason is None:
            kept.append(item)
            continue
        raw = {"question": item["question"], "response": response, "keywords": keywords}
        if detail:
            raw["problem"] = detail
        rejects.append(
            {
                "id": item["id"],
                "ability": item["ability"],
                "stage": SELF_SCORE_STAGE,
                "reason": reason,
                "raw": json.dumps(raw, ensure_ascii=False),
            }
        )
    return kept, rejects


__all__ = ["DEFAULT_MIX", "SELF_SCORE_STAGE", "build_benchmark", "self_score"]
