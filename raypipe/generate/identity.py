"""One dataset per OUT: which config fields say what the rows mean, and the check.

Every :class:`~raypipe.generate.config.GenerateConfig` field, nested ones included, is either
*identity* (changing it changes what a row with a given id is: the seed, the models,
the render and quality settings, the LLM's sampling, ...) or *operational* (how fast,
where and how much: batch sizes, actors, timeouts, limits, ``num_samples``). The table
:data:`FIELD_CLASS` says which, one dotted path a line; a test fails on a field missing
from it, so a new config field cannot slip in unclassified.

The first run into OUT records the identity in ``OUT/identity.json`` (the identity
fields' values, and digests of the ability catalog and of the LLM templates). A later
run whose identity differs is refused before it takes OUT's lease, writes anything or
sends a request, naming each changed field; ``--accept-identity-change`` proceeds and
the manifest's run history records the change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from raypipe.config import iter_fields
from raypipe.errors import IdentityChanged
from raypipe.generate.config import GenerateConfig

IDENTITY = "identity"
OPERATIONAL = "operational"

#: Every GenerateConfig field by dotted path: identity or operational. Nested configs
#: (llm, llm.vllm, render, quality) are classified field by field.
FIELD_CLASS: dict[str, str] = {
    # What to make
    "seed": IDENTITY,
    "num_samples": OPERATIONAL,  # larger extends the dataset; smaller is a no-op
    "abilities": IDENTITY,
    "catalog_dirs": OPERATIONAL,  # where ability files are; their content is identity
    "extra_keywords_per_ability": IDENTITY,
    "prompts_per_request": IDENTITY,
    "near_duplicate_threshold": IDENTITY,
    "benchmark_question_mix": IDENTITY,
    # The LLM: model and sampling are identity; endpoint and client behaviour are not
    "llm.backend": IDENTITY,
    "llm.model": IDENTITY,
    "llm.structured_output": IDENTITY,
    "llm.temperature": IDENTITY,
    "llm.max_tokens": IDENTITY,
    "llm.reasoning": IDENTITY,
    "llm.base_url": OPERATIONAL,
    "llm.api_key_env": OPERATIONAL,
    "llm.concurrency": OPERATIONAL,
    "llm.requests_per_minute": OPERATIONAL,
    "llm.tokens_per_minute": OPERATIONAL,
    "llm.max_attempts": OPERATIONAL,
    "llm.timeout_s": OPERATIONAL,
    "llm.backoff_initial_s": OPERATIONAL,
    "llm.backoff_max_s": OPERATIONAL,
    "llm.prices": OPERATIONAL,
    "llm.cache": OPERATIONAL,
    "llm.http_transport": OPERATIONAL,
    "llm.stream": OPERATIONAL,
    "llm.first_token_timeout_s": OPERATIONAL,
    "llm.idle_timeout_s": OPERATIONAL,
    "llm.outage_stop_s": OPERATIONAL,
    "llm.deadline_s": OPERATIONAL,
    "llm.api_key_file": OPERATIONAL,
    "llm.vllm.dtype": IDENTITY,
    "llm.vllm.max_model_len": IDENTITY,  # decides which requests are answered at all
    "llm.vllm.tensor_parallel_size": OPERATIONAL,
    "llm.vllm.gpu_memory_utilization": OPERATIONAL,
    "llm.vllm.enforce_eager": OPERATIONAL,
    "llm.vllm.engine_kwargs": OPERATIONAL,
    "llm.vllm.min_engines": OPERATIONAL,
    "llm.vllm.max_engines": OPERATIONAL,
    "llm.vllm.batch_size": OPERATIONAL,
    "llm.vllm.gpus_per_worker": OPERATIONAL,
    "llm.vllm.cpus_per_worker": OPERATIONAL,
    "llm.vllm.resources": OPERATIONAL,
    "llm.vllm.accelerator_type": OPERATIONAL,
    "llm.vllm.engine_restarts": OPERATIONAL,
    "llm.vllm.keep_engines": OPERATIONAL,
    "llm.vllm.deploy_timeout_s": OPERATIONAL,
    # Render: the model and everything that changes pixels are identity
    "render.model": IDENTITY,
    "render.dtype": IDENTITY,
    "render.steps": IDENTITY,
    "render.guidance_scale": IDENTITY,
    "render.width": IDENTITY,
    "render.height": IDENTITY,
    "render.scheduler": IDENTITY,
    "render.negative_prompt": IDENTITY,
    "render.emphasis": IDENTITY,
    "render.image_format": IDENTITY,
    "render.image_quality": IDENTITY,
    "render.device": OPERATIONAL,
    "render.batch_size": OPERATIONAL,
    "render.batch_invariant": OPERATIONAL,
    "render.channels_last": OPERATIONAL,
    "render.compile": OPERATIONAL,
    "render.attention": OPERATIONAL,
    "render.min_actors": OPERATIONAL,
    "render.max_actors": OPERATIONAL,
    "render.gpus_per_actor": OPERATIONAL,
    "render.cpus_per_actor": OPERATIONAL,
    "render.max_task_retries": OPERATIONAL,
    "render.resources": OPERATIONAL,
    "render.accelerator_type": OPERATIONAL,
    # Quality: the models and thresholds decide which rows are accepted
    "quality.min_std": IDENTITY,
    "quality.max_mean_dark": IDENTITY,
    "quality.check_dialogue_keyword": IDENTITY,
    "quality.clip_model": IDENTITY,
    "quality.clip_min_score": IDENTITY,
    "quality.grounding_top_k": IDENTITY,
    "quality.grounding_prompt": IDENTITY,
    "quality.safety_checker": IDENTITY,
    "quality.clip_batch_size": OPERATIONAL,
    "quality.max_actors": OPERATIONAL,
    "quality.cpus_per_actor": OPERATIONAL,
    "quality.resources": OPERATIONAL,
    "quality.accelerator_type": OPERATIONAL,
    # How the run is carried out
    "llm_actors": OPERATIONAL,
    "llm_actor_cpus": OPERATIONAL,
    "llm_actor_resources": OPERATIONAL,
    "llm_batch_chunks": OPERATIONAL,
    "part_max_rows": OPERATIONAL,
    "part_max_seconds": OPERATIONAL,
    "writer_cpus": OPERATIONAL,
    "replace_budget": OPERATIONAL,
    "max_usd": OPERATIONAL,
    "gpu_hour_usd": OPERATIONAL,
    "lease_ttl_s": OPERATIONAL,
    "lease_renew_s": OPERATIONAL,
    "ray_address": OPERATIONAL,
    "progress": OPERATIONAL,
    "log_to_driver": OPERATIONAL,
}

#: OUT's record of its identity.
IDENTITY_FILE = "identity.json"


#: Identity fields whose ``auto`` a run settles after taking the lease (the endpoint
#: check answers it); the settled value is what OUT records and compares.
SETTLED_AT_START = {"llm.structured_output"}


def leaf_fields(model: type[BaseModel] = GenerateConfig) -> list[str]:
    """Dotted paths of every field that is not itself a nested config."""
    return [
        path
        for path, _, annotation in iter_fields(model)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel))
    ]


def unclassified(model: type[BaseModel] = GenerateConfig) -> list[str]:
    """Fields of ``model`` missing from :data:`FIELD_CLASS` (a test keeps this empty)."""
    return [path for path in leaf_fields(model) if path not in FIELD_CLASS]


def _value(config: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def templates_digest() -> str:
    """A digest of the LLM request templates (their text changes what is asked)."""
    from raypipe.llm.tasks import template_texts

    return _digest(template_texts())


def dataset_identity(cfg: GenerateConfig, catalog: dict[str, Any]) -> dict[str, Any]:
    """The identity fields' values (unclassified fields count as identity: the safe
    side), the abilities made and digests of their catalog entries and the templates."""
    dumped = cfg.model_dump(mode="json")
    fields = {
        path: _value(dumped, path)
        for path in leaf_fields(type(cfg))
        if FIELD_CLASS.get(path, IDENTITY) == IDENTITY
    }
    fields["abilities"] = list(catalog)  # None means "all": record which
    return {
        "fields": fields,
        "catalog": _digest({name: _dump(a) for name, a in catalog.items()}),
        "templates": templates_digest(),
    }


def _dump(ability: Any) -> Any:
    return ability.model_dump(mode="json") if hasattr(ability, "model_dump") else str(ability)


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [recorded, now]}`` for each identity item that differs. Fields recorded
    by an older raypipe, or new in this one, count only where both sides have them."""
    out: dict[str, list[Any]] = {}
    for path in sorted(set(old.get("fields", {})) & set(new["fields"])):
        before, now = old["fields"][path], new["fields"][path]
        if path in SETTLED_AT_START and now == "auto":
            continue  # compared again once the run has settled it
        if before != now:
            out[path] = [before, now]
    for key in ("catalog", "templates"):
        if old.get(key) and old[key] != new[key]:
            out[f"({key})"] = [old[key], new[key]]
    return out


def check_identity(store, cfg: GenerateConfig, catalog, accept_change: bool) -> dict[str, Any]:
    """Step 0: compare this run's identity with OUT's; reads only (OUT stays as it was).

    Returns ``{"identity": ..., "recorded": ..., "changes": {...}}``; raises
    :class:`IdentityChanged` for a change that was not accepted.
    """
    new = dataset_identity(cfg, catalog)
    recorded = store.read_json(IDENTITY_FILE)
    on_file = recorded is not None
    if recorded is None:  # OUT from before identity.json: its manifest's config, if any
        manifest = store.read_json("manifest.json") or {}
        if manifest.get("config"):
            fields = {p: _value(manifest["config"], p) for p in new["fields"]}
            fields["abilities"] = list(manifest.get("counts", {}).get("abilities", {}))
            recorded = {"fields": fields, "num_samples": manifest.get("num_samples")}
    changed = changes(recorded, new) if recorded else {}
    if changed and not accept_change:
        lines = "\n".join(f"  {k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
        raise IdentityChanged(
            f"{store.uri} holds another dataset: these settings differ from the ones its "
            f"rows were made with:\n{lines}\nResuming would mix two datasets in one folder. "
            "Either give this run another --out, or run it with --accept-identity-change "
            "to continue into this OUT with the new settings (the manifest's run history "
            "records the change)."
        )
    return {"identity": new, "recorded": recorded, "on_file": on_file, "changes": changed}


def record_identity(store, checked: dict[str, Any], num_samples: int) -> None:
    """Write OUT/identity.json (first run, an accepted change, or a larger num_samples)."""
    recorded = checked["recorded"] or {}
    most = max(num_samples, int(recorded.get("num_samples") or 0))
    if checked["on_file"] and not checked["changes"] and recorded.get("num_samples") == most:
        return
    store.write_json(IDENTITY_FILE, {**checked["identity"], "num_samples": most})
