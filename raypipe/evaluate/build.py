"""Building a synthetic benchmark through the generation pipeline (paper section 5, Fig. 5).

:func:`build_benchmark` runs the generation job with ``benchmark_question_mix`` set: the
same planner, prompt writer, dedup, SD render pool and quality checks as training
data, but the dialogue stage is :class:`raypipe.generate.text.BenchmarkItemWriter`,
which writes a yes/no, wh- or either-or question per image with its reference response
and answer keywords. The generation run lives in ``BENCH/generation`` (a normal OUT:
resumable, with its manifest, rejects and cache). Its samples become benchmark items,
the overlap filter (:func:`raypipe.evaluate.overlap.overlap_filter`) drops those that
overlap the training data, and the benchmark folder gets ``per_ability`` items per
ability, lowest ids first.

When the filter leaves an ability short, the generation run is asked for more rows
(the same command resumes it, so nothing made is made again), up to ``max_attempts``
rounds; the report says how many items each ability got and how many were dropped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from raypipe import storage
from raypipe.config import GenerateConfig

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
    from raypipe.evaluate.items import items_from_samples, write_benchmark
    from raypipe.evaluate.overlap import overlap_filter, read_training_prompts
    from raypipe.generate.pipeline import generate
    from raypipe.generate.store import OutputStore

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
        samples = OutputStore(gen_out).read_columns(
            "data",
            [
                "id",
                "ability",
                "image",
                "prompt",
                "conversations",
                "question_type",
                "answer_keywords",
                "sd_model",
                "llm_model",
                "seed",
            ],
        )
        items = items_from_samples(samples, benchmark).to_pylist()
        if train_rows is not None:
            kept, dropped = overlap_filter(items, train_rows)
        else:
            kept, dropped = items, []
        have = Counter(i["ability"] for i in kept)
        short = {a: per_ability - have[a] for a in abilities if have[a] < per_ability}
        attempts.append(
            {
                "attempt": attempt,
                "rows_per_ability": want,
                "accepted": manifest.get("accepted"),
                "dropped_by_overlap": len(dropped),
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
        "overlap_dropped": len(dropped),
        "overlap_reasons": dict(Counter(r["reason"] for r in dropped)),
        "training_sources": list(training),
        "generation": gen_out,
        "attempts": attempts,
    }
    write_benchmark(out, chosen, dropped, report, benchmark=benchmark, overwrite=True)
    return report


__all__ = ["DEFAULT_MIX", "build_benchmark"]
