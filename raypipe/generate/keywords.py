"""Step 2 of a run: the keyword banks (paper section 4.3), written on the driver.

Each ability's bank is its seed keywords plus ``extra_keywords_per_ability`` that the
LLM lists, saved in OUT/keywords; row ``index`` of an ability draws its keyword from a
seeded walk through the bank (:func:`keyword_for`).
"""

from __future__ import annotations

import random
from typing import Any

from raypipe.abilities import Ability
from raypipe.generate.config import GenerateConfig
from raypipe.generate.llm_stage import (
    stable_seed,
    stop_if_fatal,
)
from raypipe.generate.store import OutputStore
from raypipe.llm import tasks
from raypipe.llm.config import LLMConfig
from raypipe.llm.tasks import (
    keyword_request,
    parse_keywords,
)

#: Runs that may retry a keyword bank that came out short.
MAX_BANK_ATTEMPTS = 3


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


def keyword_banks(
    cfg: GenerateConfig, store: OutputStore, catalog, backend
) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Step 2: load saved banks, expand missing or short ones, save them.

    Returns (banks, report per ability: keywords, wanted, complete, attempts). A bank
    that came out short of ``extra_keywords_per_ability`` is retried by later runs,
    ``MAX_BANK_ATTEMPTS`` times in all, with new request keys (its cached answers fell
    short, so serving them again could not help).
    """
    import pyarrow as pa

    from raypipe.schema import REJECT_SCHEMA

    banks: dict[str, list[str]] = {}
    report: dict[str, dict[str, Any]] = {}
    rejects: list[dict[str, Any]] = []
    for name, ability in catalog.items():
        wanted = len(seed_bank(ability)) + cfg.extra_keywords_per_ability
        saved = store.read_json(f"keywords/{name}.json")
        same = bool(saved) and saved.get("extra") == cfg.extra_keywords_per_ability
        attempts = int(saved.get("attempts", 1)) if same else 0
        if same and (len(saved["keywords"]) >= wanted or attempts >= MAX_BANK_ATTEMPTS):
            bank = saved["keywords"]
        else:
            bank, rej = expand_keyword_bank(
                ability,
                backend,
                cfg.extra_keywords_per_ability,
                cfg.seed,
                cfg.llm.temperature,
                start=saved["keywords"] if same else None,
                attempt=attempts,
                llm=cfg.llm,
            )
            attempts += 1
            rejects.extend(rej)
            store.write_json(
                f"keywords/{name}.json",
                {
                    "ability": name,
                    "extra": cfg.extra_keywords_per_ability,
                    "keywords": bank,
                    "attempts": attempts,
                },
            )
        banks[name] = bank
        report[name] = {
            "keywords": len(bank),
            "wanted": wanted,
            "complete": len(bank) >= wanted,
            "attempts": attempts,
            "retried_next_run": len(bank) < wanted and attempts < MAX_BANK_ATTEMPTS,
        }
    if rejects:
        store.write_table("rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    return banks, report
