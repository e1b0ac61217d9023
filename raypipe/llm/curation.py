"""In-context example curation (StableLLaVA §4.3).

The paper starts the prompt template with a handful of hand-written in-context examples,
lets the LLM write many prompts with them, and keeps a diverse, valid set of 20 as the
in-context examples of later runs. raypipe does the same per ability:

1. :func:`curate_ability` asks the backend for prompts using the ability's *seed*
   examples (``Ability.sd_examples``), ``per_request`` keywords per request, and parses
   them with the same parser the pipeline uses.
2. :func:`curate_examples` keeps the valid ones (keyword first and double-bracketed,
   length bounds), drops exact and near duplicates, and picks ``n`` by farthest-point
   selection on character-trigram and word n-gram similarity (no model needed).
3. :func:`save_curated` writes ``<dir>/<name>.curated.yaml``, a file a person can review
   and edit; the catalog loader reads it and the prompt template then uses it in place
   of the seed examples (``Ability.icl_examples``).

Run it as a job: ``python jobs/curate.py --abilities color,animal --out DIR``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raypipe.llm.tasks import check_prompt, parse_prompts, prompt_request
from raypipe.matching import emphasized_keywords, strip_emphasis

if TYPE_CHECKING:
    from raypipe.abilities import Ability
    from raypipe.llm.base import LLMBackend

__all__ = [
    "NEAR_DUPLICATE",
    "curate_ability",
    "curate_examples",
    "prompt_similarity",
    "save_curated",
]

log = logging.getLogger(__name__)

#: Similarity at or above which two prompts count as near duplicates (one is dropped).
NEAR_DUPLICATE = 0.75
#: Added to the similarity of two prompts about the same keyword during selection, so
#: the selected set spreads over keywords before it repeats one.
SAME_KEYWORD_BONUS = 0.25

CURATED_HEADER = """\
# Curated in-context examples for the ability "{name}" (StableLLaVA, section 4.3).
#
# raypipe's curation wrote this file: an LLM wrote SD prompts from the ability's seed
# examples; the valid ones (keyword first, in double brackets, within length bounds) were
# de-duplicated and {n} were picked for diversity (farthest-point selection).
#
# Review and edit it freely: while this file exists, raypipe's prompt template uses these
# examples instead of the seed examples in {name}.yaml. Each example must start with its
# keyword in double brackets, e.g. "((crimson)) vintage car, ...". Delete the file to go
# back to the seed examples; re-run `python jobs/curate.py --abilities {name}` to renew it.
"""


class _Features:
    """Character trigrams and word 1-2 grams of one prompt (emphasis removed, lowercase)."""

    __slots__ = ("chars", "words", "keyword")

    def __init__(self, prompt: str):
        text = " ".join(strip_emphasis(prompt, prose=True).lower().replace(",", " ").split())
        padded = f" {text} "
        self.chars = frozenset(padded[i : i + 3] for i in range(len(padded) - 2))
        tokens = text.split()
        self.words = frozenset(tokens) | frozenset(zip(tokens, tokens[1:]))
        found = emphasized_keywords(prompt)
        self.keyword = found[0].lower() if found else ""


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _similarity(a: _Features, b: _Features) -> float:
    return 0.5 * _jaccard(a.chars, b.chars) + 0.5 * _jaccard(a.words, b.words)


def prompt_similarity(a: str, b: str) -> float:
    """Similarity of two prompts in [0, 1]: mean of character-trigram and word 1-2-gram
    Jaccard indices (emphasis brackets and commas ignored)."""
    return _similarity(_Features(a), _Features(b))


def curate_examples(
    ability: Ability, candidates: Sequence[str], n: int = 20, seed: int = 0
) -> list[str]:
    """Pick up to ``n`` valid, distinct, diverse prompts from ``candidates``.

    Deterministic in (candidates, n, seed). Returns fewer than ``n`` only when fewer
    valid, mutually distinct candidates exist. The result is in selection order (each
    example the farthest from those before it).
    """
    # 1. Validate: keyword first and double-bracketed, length bounds; normalise.
    valid: list[str] = []
    invalid = 0
    for cand in candidates:
        prompt, _reason = check_prompt(cand)
        if prompt is None:
            invalid += 1
        else:
            valid.append(prompt)

    # 2. Drop exact duplicates, then near duplicates (first seen wins).
    kept: list[str] = []
    feats: list[_Features] = []
    seen: set[str] = set()
    near = 0
    for prompt in valid:
        norm = " ".join(prompt.lower().replace("-", " ").split())
        if norm in seen:
            near += 1
            continue
        f = _Features(prompt)
        if any(_similarity(f, g) >= NEAR_DUPLICATE for g in feats):
            near += 1
            continue
        seen.add(norm)
        kept.append(prompt)
        feats.append(f)
    log.info(
        "curate %s: %d candidates, %d invalid, %d duplicates, %d distinct",
        ability.name,
        len(candidates),
        invalid,
        near,
        len(kept),
    )
    if len(kept) <= n:
        return kept

    # 3. Farthest-point selection: start at a seeded candidate, then repeatedly take the
    #    one whose highest similarity to the chosen set is lowest (ties: earliest).
    def sim(i: int, j: int) -> float:
        s = _similarity(feats[i], feats[j])
        if feats[i].keyword and feats[i].keyword == feats[j].keyword:
            s += SAME_KEYWORD_BONUS
        return s

    start = random.Random(f"curate:{ability.name}:{seed}").randrange(len(kept))
    chosen = [start]
    closest = [sim(start, j) for j in range(len(kept))]
    closest[start] = float("inf")
    while len(chosen) < n:
        best = min(range(len(kept)), key=lambda j: (closest[j], j))
        chosen.append(best)
        closest[best] = float("inf")
        for j in range(len(kept)):
            if closest[j] != float("inf"):
                closest[j] = max(closest[j], sim(best, j))
    return [kept[i] for i in chosen]


def curate_ability(
    ability: Ability,
    backend: LLMBackend,
    rounds: int = 6,
    per_request: int = 10,
    seed: int = 0,
    n: int = 20,
    temperature: float = 0.9,
) -> list[str]:
    """Generate candidates with the ability's seed examples, then :func:`curate_examples`.

    Sends ``rounds`` prompt requests of ``per_request`` keywords each (keywords walk a
    seeded shuffle of the ability's bank) in one batch. Requests that fail and prompts
    that do not parse are counted in the log and left out of the candidates.
    """
    order = list(ability.keywords)
    random.Random(f"curate:{ability.name}:{seed}").shuffle(order)
    requests, assigned = [], []
    for r in range(rounds):
        keywords = [order[(r * per_request + i) % len(order)] for i in range(per_request)]
        assigned.append(keywords)
        requests.append(
            prompt_request(
                ability,
                keywords,
                key=f"curate/{ability.name}/{r:04d}",
                seed=seed * 100_003 + r,
                temperature=temperature,
                examples=ability.sd_examples,
            )
        )
    results = backend.complete_batch(requests)

    candidates: list[str] = []
    failed = rejected = 0
    for keywords, result in zip(assigned, results):
        if not result.ok:
            failed += 1
            log.warning("curate %s: request %s failed: %s", ability.name, result.key, result.error)
            continue
        for parsed in parse_prompts(result.text, keywords):
            if parsed.ok:
                candidates.append(parsed.prompt)
            else:
                rejected += 1
    log.info(
        "curate %s: %d requests (%d failed), %d prompts, %d rejected",
        ability.name,
        len(requests),
        failed,
        len(candidates),
        rejected,
    )
    return curate_examples(ability, candidates, n=n, seed=seed)


def save_curated(ability_name: str, examples: Sequence[str], dir: str | Path) -> Path:
    """Write ``<dir>/<ability_name>.curated.yaml`` (the catalog's curated-examples file)."""
    path = Path(dir) / f"{ability_name}.curated.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(
        {"ability": ability_name, "examples": list(examples)},
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1000,
    )
    header = CURATED_HEADER.format(name=ability_name, n=len(examples))
    path.write_text(header + body, encoding="utf-8")
    return path
