"""Compose the generation stages on Ray Data and write OUT (DESIGN.md section 3).

    generate(cfg, out)  # what jobs/generate.py calls

1. Check inputs: abilities, LLM endpoint, render model, OUT; fail before any rendering.
2. Keyword banks, once per ability (saved in OUT/keywords, reused on re-runs).
3. Plan: per ability, the rows still missing (ids already in OUT/data or OUT/rejects are
   skipped, so a re-run continues where a killed run stopped).
4. SD prompts on an actor pool of LLM clients, k rows per request; prompt dedup.
5. Dialogues -> render (GPU actor pool) -> quality checks -> Parquet parts, streamed.
6. Repeat 3-5 while rejects left an ability short of its quota (bounded rounds).
7. Manifest and summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa

from raypipe.abilities import load_catalog
from raypipe.config import GenerateConfig, redacted
from raypipe.errors import ConfigError
from raypipe.generate.dedup import NearDuplicateIndex
from raypipe.generate.store import OutputStore
from raypipe.generate.text import DialogueWriter, PromptWriter, expand_keyword_bank, keyword_for
from raypipe.llm.base import Secret
from raypipe.schema import (
    REJECT_SCHEMA,
    is_rejected,
    reject,
    rows_to_table,
    sample_id,
    split_accepted,
)

log = logging.getLogger("raypipe.generate")

#: Stages in the order rows meet them; a row is rejected by at most one.
SAMPLE_STAGES = ("prompts", "dedup", "dialogue", "render", "quality")


# ------------------------------------------------------------------------------------
# Stage composition
# ------------------------------------------------------------------------------------


def write_parts(batch: pa.Table, uri: str) -> pa.Table:
    """Last stage: accepted rows -> OUT/data, rejected rows -> OUT/rejects (one part each).

    Returns a small summary per row (no image bytes) for the driver's counters.
    """
    store = OutputStore(uri)
    data, rejects = split_accepted(batch)
    store.write_table("data", data)
    store.write_table("rejects", rejects)
    rows = batch.select(["id", "ability", "reject_stage", "reject_reason", "meta"])
    return rows


def driver_key(cfg: GenerateConfig) -> Secret | None:
    """The driver's API key, for actors on nodes where the variable is not set."""
    value = os.environ.get(cfg.llm.api_key_env) if cfg.llm.backend == "openai" else None
    return Secret(value) if value else None


def build_prompt_dataset(cfg: GenerateConfig, chunks: list[dict[str, Any]], cache_dir: str):
    """Planned request chunks -> work rows with SD prompts (an actor pool of LLM clients)."""
    import ray

    ds = ray.data.from_items(
        chunks, override_num_blocks=max(1, len(chunks) // cfg.llm_batch_chunks)
    )
    return ds.map_batches(
        PromptWriter,
        fn_constructor_kwargs=dict(
            llm=cfg.llm.model_dump(),
            cache_dir=cache_dir,
            catalog_dirs=cfg.catalog_dirs,
            run_seed=cfg.seed,
            negative_prompt=cfg.render.negative_prompt,
            api_key=driver_key(cfg),
        ),
        batch_size=cfg.llm_batch_chunks,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.llm_actors),
        num_cpus=cfg.llm_actor_cpus,
    )


def build_generation(cfg: GenerateConfig, rows: pa.Table, store: OutputStore, cache_dir: str):
    """Prompted work rows -> dialogues -> render -> quality -> Parquet parts (streamed)."""
    import ray

    from raypipe.generate.quality import add_quality
    from raypipe.generate.render import add_render

    # Many small blocks, not one: Ray Data streams block by block, so a single block
    # would hold every row back until the last dialogue is written.
    step = cfg.llm_batch_rows
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    ds = ds.map_batches(
        DialogueWriter,
        fn_constructor_kwargs=dict(
            llm=cfg.llm.model_dump(),
            cache_dir=cache_dir,
            catalog_dirs=cfg.catalog_dirs,
            run_seed=cfg.seed,
            api_key=driver_key(cfg),
        ),
        batch_size=cfg.llm_batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.llm_actors),
        num_cpus=cfg.llm_actor_cpus,
    )
    ds = add_render(ds, cfg.render)
    ds = add_quality(ds, cfg.quality)
    return ds.map_batches(
        write_parts,
        fn_kwargs={"uri": store.uri},
        batch_size=cfg.rows_per_file,
        batch_format="pyarrow",
        num_cpus=cfg.writer_cpus,
    )


# ------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------


def check_inputs(cfg: GenerateConfig, store: OutputStore) -> dict[str, Any]:
    """Step 1: everything that can fail cheaply fails here, before Ray or any model loads."""
    from raypipe.generate.quality import check_quality_models
    from raypipe.generate.render import check_render_model
    from raypipe.llm import make_backend

    catalog = load_catalog(cfg.catalog_dirs or None, names=cfg.abilities)
    backend = make_backend(cfg.llm, store.local_cache_dir() if cfg.llm.cache else None, catalog)
    if hasattr(backend, "check"):
        backend.check()
    check_render_model(cfg.render)
    check_quality_models(cfg.quality)
    try:
        store.makedirs()
    except OSError as e:
        raise ConfigError(
            f"cannot create output folders under {store.uri}: {e}. Choose a writable --out."
        ) from None
    return {"catalog": catalog, "backend": backend}


def keyword_banks(
    cfg: GenerateConfig, store: OutputStore, catalog, backend
) -> dict[str, list[str]]:
    """Step 2: load saved banks, expand missing ones, save them."""
    banks: dict[str, list[str]] = {}
    rejects: list[dict[str, Any]] = []
    for name, ability in catalog.items():
        saved = store.read_json(f"keywords/{name}.json")
        if saved and saved.get("extra") == cfg.extra_keywords_per_ability:
            banks[name] = saved["keywords"]
            continue
        bank, rej = expand_keyword_bank(
            ability, backend, cfg.extra_keywords_per_ability, cfg.seed, cfg.llm.temperature
        )
        banks[name] = bank
        rejects.extend(rej)
        store.write_json(
            f"keywords/{name}.json",
            {"ability": name, "extra": cfg.extra_keywords_per_ability, "keywords": bank},
        )
    if rejects:
        store.write_table("rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    return banks


def quotas(cfg: GenerateConfig, names: list[str]) -> dict[str, int]:
    base, extra = divmod(cfg.num_samples, len(names))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(names)}


def plan_chunks(
    cfg: GenerateConfig,
    banks: dict[str, list[str]],
    quota: dict[str, int],
    done: set[str],
    accepted: dict[str, int],
) -> list[dict[str, Any]]:
    """Step 3: the smallest unused indices per ability, grouped by request chunk."""
    k = cfg.prompts_per_request
    chunks: dict[tuple[str, int], dict[str, Any]] = {}
    for name, want in quota.items():
        need, index = want - accepted.get(name, 0), 0
        while need > 0:
            sid = sample_id(cfg.seed, name, index)
            if sid not in done:
                chunk = index // k
                item = chunks.setdefault(
                    (name, chunk),
                    {
                        "ability": name,
                        "chunk": chunk,
                        "indices": [],
                        "ids": [],
                        "chunk_keywords": [
                            keyword_for(banks[name], cfg.seed, name, i)
                            for i in range(chunk * k, chunk * k + k)
                        ],
                    },
                )
                item["indices"].append(index)
                item["ids"].append(sid)
                need -= 1
            index += 1
    return list(chunks.values())


def dedup_prompts(
    cfg: GenerateConfig, rows: list[dict[str, Any]], index: NearDuplicateIndex
) -> None:
    """Step 4b: reject exact and near-duplicate prompts, lowest index first (deterministic)."""
    for row in sorted(rows, key=lambda r: (r["ability"], r["index"])):
        if is_rejected(row):
            continue
        hit = index.check_and_add(row["id"], row["prompt"])
        if hit:
            reason, other = hit
            reject(row, "dedup", reason, json.dumps({"prompt": row["prompt"], "repeats": other}))


def seed_dedup_index(cfg: GenerateConfig, store: OutputStore) -> NearDuplicateIndex:
    index = NearDuplicateIndex(cfg.near_duplicate_threshold, seed=cfg.seed)
    data = store.read_columns("data", ["id", "prompt"])
    for sid, prompt in zip(data.column("id").to_pylist(), data.column("prompt").to_pylist()):
        index.add(sid, prompt)
    return index


# ------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------


def generate(cfg: GenerateConfig, out: str) -> dict[str, Any]:
    """Run (or resume) generation into ``out``; returns the manifest."""
    import ray

    t_start = time.time()
    store = OutputStore(out)
    # 1. Check inputs.
    checked = check_inputs(cfg, store)
    catalog, backend = checked["catalog"], checked["backend"]
    names = list(catalog)
    cache_dir = store.local_cache_dir() if cfg.llm.cache else None
    timings: dict[str, float] = {}

    # 2. Keyword banks.
    t = time.time()
    banks = keyword_banks(cfg, store, catalog, backend)
    timings["keywords_s"] = time.time() - t

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, log_to_driver=cfg.log_to_driver)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress

    quota = quotas(cfg, names)
    run = Counter()
    per_stage_seconds: Counter = Counter()
    rendered = 0
    for round_ in range(cfg.max_rounds):
        # 3. Plan what is missing.
        done, accepted = store.done_ids()
        chunks = plan_chunks(cfg, banks, quota, done, accepted)
        if not chunks:
            break
        log.info("round %d: %d rows to make", round_ + 1, sum(len(c["ids"]) for c in chunks))

        # 4. Prompts, then dedup against everything accepted so far.
        t = time.time()
        rows: list[dict[str, Any]] = []
        for batch in build_prompt_dataset(cfg, chunks, cache_dir).iter_batches(
            batch_format="pyarrow", batch_size=None
        ):
            rows.extend(batch.to_pylist())
        dedup_prompts(cfg, rows, seed_dedup_index(cfg, store))
        timings["prompts_s"] = timings.get("prompts_s", 0.0) + time.time() - t
        early = [r for r in rows if is_rejected(r)]
        keep = [r for r in rows if not is_rejected(r)]
        _, early_rejects = split_accepted(rows_to_table(early))
        store.write_table("rejects", early_rejects)
        for r in early:
            run[(r["ability"], r["reject_stage"], r["reject_reason"])] += 1
        _count_llm(early, run)

        # 5. Dialogues -> render -> quality -> Parquet, streamed.
        t = time.time()
        if keep:
            ds = build_generation(cfg, rows_to_table(keep), store, cache_dir)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.to_pylist():
                    run[(r["ability"], r["reject_stage"] or "", r["reject_reason"] or "")] += 1
                    meta = json.loads(r["meta"] or "{}")
                    if "render_s" in meta:
                        rendered += 1
                        per_stage_seconds["render"] += meta["render_s"]
                    _count_llm([r], run, meta)
        timings["render_phase_s"] = timings.get("render_phase_s", 0.0) + time.time() - t

    # 7. Manifest and summary.
    timings["total_s"] = time.time() - t_start
    manifest = build_manifest(cfg, store, banks, backend, run, timings, rendered, quota)
    store.write_json("manifest.json", manifest)
    return manifest


def _count_llm(rows: list[dict[str, Any]], run: Counter, meta: dict | None = None) -> None:
    for r in rows:
        m = meta if meta is not None else json.loads(r.get("meta") or "{}")
        for usage in m.get("llm", {}).values():
            run["llm_prompt_tokens"] += usage.get("prompt_tokens", 0)
            run["llm_completion_tokens"] += usage.get("completion_tokens", 0)
            run["llm_cost_usd"] += usage.get("cost_usd", 0.0)


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
        "tenacity",
        "pyarrow",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_manifest(
    cfg, store, banks, backend, run: Counter, timings, rendered: int, quota
) -> dict[str, Any]:
    """Counts come from OUT itself (all runs), so they balance across resumes."""
    data = store.read_columns("data", ["id", "ability"])
    rej = store.read_columns("rejects", ["id", "ability", "stage", "reason"])
    rej_rows = rej.to_pylist()
    sample_rej = [r for r in rej_rows if r["stage"] != "keywords"]
    accepted_by_ability = Counter(data.column("ability").to_pylist())
    rejected_by = Counter((r["ability"], r["stage"], r["reason"]) for r in sample_rej)

    stages: dict[str, dict[str, int]] = {}
    remaining = data.num_rows + len(sample_rej)
    for stage in SAMPLE_STAGES:
        n_rej = sum(1 for r in sample_rej if r["stage"] == stage)
        stages[stage] = {"in": remaining, "accepted": remaining - n_rej, "rejected": n_rej}
        remaining -= n_rej
    kw_rej = [r for r in rej_rows if r["stage"] == "keywords"]
    stages["keywords"] = {
        "in": sum(len(b) for b in banks.values()) + len(kw_rej),
        "accepted": sum(len(b) for b in banks.values()),
        "rejected": len(kw_rej),
    }
    abilities = {
        name: {
            "quota": quota[name],
            "accepted": accepted_by_ability.get(name, 0),
            "rejected": sum(v for (a, _, _), v in rejected_by.items() if a == name),
            "keywords": len(banks[name]),
        }
        for name in quota
    }
    reasons = defaultdict(int)
    for (_, stage, reason), v in rejected_by.items():
        reasons[f"{stage}:{reason}"] += v

    previous = store.read_json("manifest.json") or {}
    kw_stats = backend.stats()
    this_run = {
        "started": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - timings["total_s"])
        ),
        "timings_s": timings,
        "rows_written": sum(v for k, v in run.items() if isinstance(k, tuple)),
        "images_rendered": rendered,
        "images_per_s": rendered / timings["render_phase_s"]
        if timings.get("render_phase_s")
        else 0.0,
        "llm": {
            "prompt_tokens": run["llm_prompt_tokens"] + kw_stats.get("prompt_tokens", 0),
            "completion_tokens": run["llm_completion_tokens"]
            + kw_stats.get("completion_tokens", 0),
            "cost_usd": run["llm_cost_usd"] + kw_stats.get("cost_usd", 0.0),
        },
    }
    runs = list(previous.get("runs", [])) + [this_run]
    return {
        "raypipe_manifest": 1,
        "out": store.uri,
        "config": redacted(cfg),
        "versions": package_versions(),
        "models": {"sd": cfg.render.model, "llm": backend.model},
        "num_samples": cfg.num_samples,
        "counts": {
            "accepted": data.num_rows,
            "rejected": len(sample_rej),
            "balanced": stages["prompts"]["in"] == data.num_rows + len(sample_rej),
            "stages": stages,
            "abilities": abilities,
            "reject_reasons": dict(sorted(reasons.items())),
        },
        "llm": {
            "prompt_tokens": sum(r["llm"]["prompt_tokens"] for r in runs),
            "completion_tokens": sum(r["llm"]["completion_tokens"] for r in runs),
            "cost_usd": sum(r["llm"]["cost_usd"] for r in runs),
        },
        "runs": runs,
    }


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
        f"LLM tokens: {llm['prompt_tokens']:.0f} in / {llm['completion_tokens']:.0f} out, cost ${llm['cost_usd']:.4f}"
        f" | images this run: {run['images_rendered']} at {run['images_per_s']:.2f}/s"
        f" | wall {run['timings_s']['total_s']:.1f}s"
    )
    return "\n".join(lines)
