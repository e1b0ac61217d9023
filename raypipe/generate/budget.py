"""What a generation run will make and cost, before anything is paid.

    est = estimate(cfg, catalog, done_rows)  # jobs/generate.py --dry-run
    print(format_estimate(est))

No HTTP call and no model: the LLM requests are rendered with the real templates
(:mod:`raypipe.llm.tasks`) and measured; GPU time comes from a FLOP model of the
render settings. Every figure has two columns:

- ``planned``: the rows still missing from each ability's quota, if none is rejected;
- ``worst_case``: plus every replacement row ``replace_budget`` allows, all of them paid.

Tokens are upper bounds for the requests counted: prompt tokens are measured on
requests rendered with each ability's longest keywords, questions and an SD prompt at
the parser's length limit, counted by :func:`count_prompt_tokens` (which errs high);
completion tokens are each request's ``max_tokens``, the limit sent to the endpoint.
Answers already in OUT/cache cost nothing and are not subtracted.

GPU time (an estimate, not a bound): per image, ``steps`` UNet calls (two per step with
classifier-free guidance, i.e. ``guidance_scale > 1``) plus one VAE decode, with FLOPs
scaled from SD 1.5 at 512x512 px (:data:`UNET_TFLOP_512`, :data:`VAE_TFLOP_512`) by the
pixel count, at :data:`DEFAULT_SUSTAINED_TFLOPS`. Pass ``gpu_tflops`` (sustained TFLOP/s
of your GPU) or ``gpu_s_per_image`` (measured, e.g. from the manifest's images_per_s)
to override.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from raypipe.generate.config import GenerateConfig
from raypipe.llm.config import LLMConfig
from raypipe.llm.tasks import dialogue_request, for_run, keyword_request, prompt_request
from raypipe.llm.tasks.common import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from raypipe.abilities import Ability
    from raypipe.llm.base import LLMRequest

__all__ = [
    "DEFAULT_SUSTAINED_TFLOPS",
    "KEYWORDS_PER_REQUEST",
    "UNET_TFLOP_512",
    "VAE_TFLOP_512",
    "count_prompt_tokens",
    "estimate",
    "format_estimate",
]

TASKS = ("keywords", "prompts", "dialogue")

#: Keywords asked for per keyword-bank request (``expand_keyword_bank``'s per_request).
KEYWORDS_PER_REQUEST = 50
#: Unproductive keyword requests in a row after which a bank stops growing (keywords.py's
#: ``stale < 3``): counted once per bank in the worst case.
KEYWORD_STALE_ROUNDS = 3

#: One UNet forward of an SD 1.x/2.x-sized UNet (~860M parameters) on a 64x64 latent
#: (512x512 px), batch 1: about 0.4 TMAC = 0.8 TFLOP.
UNET_TFLOP_512 = 0.8
#: One VAE decode of a 512x512 px image: about 1.25 TMAC = 2.5 TFLOP.
VAE_TFLOP_512 = 2.5
REFERENCE_PIXELS = 512 * 512
#: Assumed sustained throughput: 40% of an H100 SXM's 990 dense fp16 TFLOP/s. An
#: assumption, not a measurement: small batches, an uncompiled UNet, a busy CPU or an
#: older GPU do worse. Measure once (the manifest's images_per_s) and pass
#: ``gpu_s_per_image``.
DEFAULT_SUSTAINED_TFLOPS = 0.4 * 990.0

_PIECE_RE = re.compile(r"\w+|[^\w\s]+|\n")


def count_prompt_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """Chat prompt tokens, erring high: each word, punctuation run or newline is at least
    one token and one more per 4 UTF-8 bytes beyond the first 4, plus 4 per message and 3
    per request (OpenAI's chat overhead). About 1.2-1.4x what GPT-4o's tokenizer counts
    for English prompts like raypipe's."""
    total = 3
    for m in messages:
        text = str(m.get("content") or "")
        total += 4 + sum(max(1, math.ceil(len(p.encode()) / 4)) for p in _PIECE_RE.findall(text))
    return total


# ------------------------------------------------------------------------------------
# Representative requests
# ------------------------------------------------------------------------------------


def _longest(items: Iterable[str], n: int) -> list[str]:
    return sorted(items, key=lambda s: (-len(s), s))[:n]


def _long_sd_prompt(ability: Ability) -> str:
    """The ability's longest in-context prompt, extended with its own words to the
    parser's length limit: the longest SD prompt a dialogue request can carry."""
    base = _longest(ability.icl_examples or ability.sd_examples, 1)[0]
    words, text, i = base.split(), base, 0
    while len(text) < MAX_PROMPT_CHARS and words:
        text += " " + words[i % len(words)]
        i += 1
    return text[:MAX_PROMPT_CHARS]


def _sample_requests(cfg: GenerateConfig, ability: Ability) -> dict[str, LLMRequest]:
    """One request per task, rendered as the pipeline renders them, at their longest."""
    k, extra = cfg.prompts_per_request, cfg.extra_keywords_per_ability
    seed = list(ability.keywords)
    out = {
        "prompts": prompt_request(ability, (_longest(seed, k) * k)[:k], "budget/prompts"),
        "dialogue": dialogue_request(
            ability, _long_sd_prompt(ability), _longest(ability.questions, 1)[0], "budget/dialogue"
        ),
    }
    if extra:
        # The last request of a bank lists every keyword but the last few as existing.
        bank = (seed * (1 + (len(seed) + extra) // len(seed)))[: len(seed) + extra]
        out["keywords"] = keyword_request(
            ability, min(KEYWORDS_PER_REQUEST, extra), bank, "budget/keywords"
        )
    # As the run sends them: each task's limit capped by llm.max_tokens (no schema here).
    return {task: for_run(req, cfg.llm, structured=False) for task, req in out.items()}


# ------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------


def _quotas(cfg: GenerateConfig, names: list[str]) -> dict[str, int]:
    from raypipe.generate.pipeline import quotas

    return quotas(cfg, names)


def _replacements(cfg: GenerateConfig, missing: int) -> int:
    """Rows the planner may add to replace rejects for an ability missing ``missing``
    rows: the replace_budget fraction of them, at least one request's worth (k), as
    ``Planner`` counts them."""
    if missing <= 0:
        return 0
    return max(cfg.prompts_per_request, math.ceil(missing * cfg.replace_budget))


def _llm_price(llm: LLMConfig) -> tuple[tuple[float, float] | None, str]:
    """(USD per million prompt/completion tokens or None, what the price means)."""
    if llm.backend == "offline":
        return None, "offline writer: no LLM is called, cost 0 USD"
    if llm.backend == "vllm":
        return None, (
            "vllm: engines in the run, no token prices (their GPU time is priced by "
            "gpu_hour_usd in the manifest)"
        )
    from raypipe.llm.pricing import price_of  # the client's own lookup: exact, then prefix

    price = price_of(llm.prices, llm.model)
    if price is None:
        return None, (
            f"no price for model {llm.model!r} in llm.prices: cost counted as 0 USD "
            f"(add llm.prices.{llm.model}=[prompt, completion] in USD per million tokens)"
        )
    return tuple(price), f"{llm.model} at {price[0]:g} / {price[1]:g} USD per million tokens"


def _gpu(
    cfg: GenerateConfig, rows: dict[str, int], gpu_tflops: float | None, s_per_image: float | None
) -> dict[str, Any]:
    r = cfg.render
    cfg_pass = r.guidance_scale > 1  # RenderConfig: <= 1 turns guidance off
    scale = r.width * r.height / REFERENCE_PIXELS
    tflop = scale * (r.steps * UNET_TFLOP_512 * (2 if cfg_pass else 1) + VAE_TFLOP_512)
    sustained = gpu_tflops or DEFAULT_SUSTAINED_TFLOPS
    measured = s_per_image is not None
    s = s_per_image if measured else tflop / sustained
    hours = {col: n * s / 3600 for col, n in rows.items()}
    actors = r.max_actors
    if measured:
        assumption = f"{s:g} s per image, as given"
    else:
        assumption = (
            f"{tflop:.1f} TFLOP per image = ({r.steps} steps x {UNET_TFLOP_512:g} TFLOP UNet"
            f"{' x2 for guidance' if cfg_pass else ''} + {VAE_TFLOP_512:g} TFLOP VAE decode)"
            f" x {scale:.2f} (pixels vs 512x512, SD 1.5-sized UNet), at {sustained:.0f} "
            f"TFLOP/s sustained"
            + (" (40% of an H100's 990 dense fp16)" if gpu_tflops is None else " (as given)")
        )
    return {
        "model": r.model,
        "device": r.device,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "guidance": cfg_pass,
        "tflop_per_image": tflop,
        "sustained_tflops": sustained,
        "s_per_image": s,
        "hours": hours,
        "actors": actors,
        # Every actor of the largest pool busy, one image stream each.
        "wall_hours": {col: h / actors for col, h in hours.items()},
        "gpu_hour_usd": cfg.gpu_hour_usd,
        "usd": {col: h * cfg.gpu_hour_usd for col, h in hours.items()}
        if cfg.gpu_hour_usd is not None
        else None,
        "assumption": assumption,
    }


def estimate(
    cfg: GenerateConfig,
    catalog: Mapping[str, Ability],
    done_rows: dict[str, int] | None = None,
    *,
    banks_saved: Iterable[str] = (),
    gpu_tflops: float | None = None,
    gpu_s_per_image: float | None = None,
) -> dict[str, Any]:
    """The plan and its cost for ``cfg`` over ``catalog`` (the run's abilities).

    Args:
        done_rows: accepted rows already in OUT/data, per ability (None: a fresh run).
        banks_saved: abilities whose keyword bank OUT/keywords already holds (no requests).
        gpu_tflops: sustained TFLOP/s of the render GPU (default
            :data:`DEFAULT_SUSTAINED_TFLOPS`).
        gpu_s_per_image: measured GPU-seconds per image; replaces the FLOP model.

    Returns a dict with ``abilities`` ({name: quota, accepted, to_make, replace}),
    ``rows``, ``requests`` and ``tokens`` ({task or kind: {planned, worst_case}}),
    ``tokens_per_request``, ``llm``, ``gpu``, ``usd``, ``max_usd`` and ``notes``.
    """
    done_rows = done_rows or {}
    names = list(catalog)
    quota = _quotas(cfg, names)
    cols = ("planned", "worst_case")

    # 1. Rows per ability.
    abilities, rows = _rows(cfg, quota, done_rows)

    # 2. Requests and tokens, per ability from its own rendered requests.
    requests, tokens, per_request = _requests_and_tokens(cfg, catalog, abilities, set(banks_saved))

    # 3. LLM cost.
    price, price_note = _llm_price(cfg.llm)
    llm_usd = {
        col: (tokens["prompt"][col] * price[0] + tokens["completion"][col] * price[1]) / 1e6
        if price
        else 0.0
        for col in cols
    }

    # 4. GPU time and cost.
    rendered = {"planned": rows["to_make"], "worst_case": rows["worst_case"]}
    gpu = _gpu(cfg, rendered, gpu_tflops, gpu_s_per_image)

    # 5. Totals and warnings.
    usd = {col: llm_usd[col] + (gpu["usd"][col] if gpu["usd"] else 0.0) for col in cols}
    return {
        "num_samples": cfg.num_samples,
        "prompts_per_request": cfg.prompts_per_request,
        "replace_budget": cfg.replace_budget,
        "abilities": abilities,
        "rows": rows,
        "requests": requests,
        "tokens": tokens,
        "tokens_per_request": per_request,
        "llm": {
            "backend": cfg.llm.backend,
            "model": cfg.llm.model,
            "price_usd_per_m": list(price) if price else None,
            "usd": llm_usd,
        },
        "gpu": gpu,
        "usd": usd,
        "max_usd": cfg.max_usd,
        "notes": _notes(cfg, price_note, gpu, llm_usd, rows),
    }


def _rows(cfg: GenerateConfig, quota: dict[str, int], done_rows: dict[str, int]):
    """Per ability: quota, rows already accepted, rows to make and replacements; totals."""
    abilities: dict[str, dict[str, int]] = {}
    for name, wanted in quota.items():
        accepted = int(done_rows.get(name, 0))
        to_make = max(0, wanted - accepted)
        abilities[name] = {
            "quota": wanted,
            "accepted": accepted,
            "to_make": to_make,
            "replace": _replacements(cfg, to_make),
        }
    rows = {
        "quota": sum(a["quota"] for a in abilities.values()),
        "accepted": sum(min(a["accepted"], a["quota"]) for a in abilities.values()),
        "to_make": sum(a["to_make"] for a in abilities.values()),
        "replace": sum(a["replace"] for a in abilities.values()),
    }
    rows["worst_case"] = rows["to_make"] + rows["replace"]
    return abilities, rows


def _requests_and_tokens(cfg, catalog, abilities, saved: set[str]):
    """Requests per task and tokens per kind ({planned, worst_case}), and the largest
    request of each task, from each ability's own rendered sample requests."""
    cols = ("planned", "worst_case")
    k = cfg.prompts_per_request
    requests = {t: dict.fromkeys(cols, 0) for t in (*TASKS, "total")}
    tokens = {kind: dict.fromkeys(cols, 0) for kind in ("prompt", "completion")}
    per_request: dict[str, dict[str, int]] = {}
    for name, ability in catalog.items():
        a = abilities[name]
        samples = _sample_requests(cfg, ability)
        bank_requests = 0
        if cfg.extra_keywords_per_ability and name not in saved:
            bank_requests = math.ceil(cfg.extra_keywords_per_ability / KEYWORDS_PER_REQUEST)
        n = {
            "keywords": (bank_requests, bank_requests + KEYWORD_STALE_ROUNDS * bool(bank_requests)),
            "prompts": (math.ceil(a["to_make"] / k), math.ceil((a["to_make"] + a["replace"]) / k)),
            "dialogue": (a["to_make"], a["to_make"] + a["replace"]),
        }
        for task in TASKS:
            if task not in samples:
                continue
            req = samples[task]
            p_tok, c_tok = count_prompt_tokens(req.messages), req.max_tokens
            seen = per_request.setdefault(task, {"prompt": 0, "completion": 0})
            seen["prompt"], seen["completion"] = (
                max(seen["prompt"], p_tok),
                max(seen["completion"], c_tok),
            )
            for col, count in zip(cols, n[task]):
                requests[task][col] += count
                requests["total"][col] += count
                tokens["prompt"][col] += count * p_tok
                tokens["completion"][col] += count * c_tok
    return requests, tokens, per_request


def _notes(cfg: GenerateConfig, price_note: str, gpu: dict, llm_usd: dict, rows: dict) -> list:
    notes = [price_note]
    if gpu["usd"] is None:
        notes.append("GPU cost not counted: set gpu_hour_usd=<USD per GPU-hour>")
    if gpu["device"] == "cpu":
        notes.append("render.device=cpu: the GPU figures do not apply to this run")
    if cfg.max_usd is not None and llm_usd["worst_case"] > cfg.max_usd:
        notes.append(
            f"max_usd={cfg.max_usd:g} is below the worst-case LLM cost: the run may stop "
            "early; running the same command again continues"
        )
    if rows["to_make"] == 0:
        notes.append("every ability has its quota: nothing to make")
    return notes


# ------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def format_estimate(est: dict[str, Any]) -> str:
    """The estimate as tables, for the terminal."""
    rows, req, tok, gpu = est["rows"], est["requests"], est["tokens"], est["gpu"]
    lines = [
        f"Plan: {rows['quota']} rows wanted, {rows['accepted']} already accepted, "
        f"{rows['to_make']} to make; up to {rows['replace']} more may replace rejects "
        f"(replace_budget={est['replace_budget']:g}).",
        "",
        f"{'ability':<14} {'quota':>8} {'accepted':>9} {'to make':>8} {'replace':>8}",
    ]
    for name, a in est["abilities"].items():
        lines.append(
            f"{name:<14} {a['quota']:>8} {a['accepted']:>9} {a['to_make']:>8} {a['replace']:>8}"
        )
    lines += [
        f"{'total':<14} {rows['quota']:>8} {rows['accepted']:>9} {rows['to_make']:>8} {rows['replace']:>8}",
        "",
        f"{'':<24} {'planned':>14} {'worst case':>14}",
    ]

    def line(label: str, d: dict[str, float], fmt=_n) -> str:
        return f"{label:<24} {fmt(d['planned']):>14} {fmt(d['worst_case']):>14}"

    k = est["prompts_per_request"]
    lines += [
        line("rows rendered", {"planned": rows["to_make"], "worst_case": rows["worst_case"]}),
        line("LLM requests: keywords", req["keywords"]),
        line(f"              prompts/{k}", req["prompts"]),
        line("              dialogue", req["dialogue"]),
        line("              total", req["total"]),
        line("prompt tokens (max)", tok["prompt"]),
        line("completion tokens (max)", tok["completion"]),
        line(
            f"LLM USD ({est['llm']['model'] if est['llm']['backend'] == 'openai' else est['llm']['backend']})",
            est["llm"]["usd"],
            _usd,
        ),
        line("GPU-hours", gpu["hours"], lambda x: f"{x:,.2f}"),
        line(f"wall hours, {gpu['actors']} actor(s)", gpu["wall_hours"], lambda x: f"{x:,.2f}"),
    ]
    if gpu["usd"] is not None:
        lines.append(line(f"GPU USD at ${gpu['gpu_hour_usd']:g}/h", gpu["usd"], _usd))
    lines.append(line("total USD", est["usd"], _usd))
    if est["max_usd"] is not None:
        lines.append(f"{'max_usd (LLM cap)':<24} {_usd(est['max_usd']):>14}")
    lines += ["", f"GPU time: {gpu['assumption']}."]
    per = est["tokens_per_request"]
    if per:
        lines.append(
            "Per request (max over abilities), prompt/completion tokens: "
            + ", ".join(f"{t} {v['prompt']}/{v['completion']}" for t, v in per.items())
            + ". Completion is each request's max_tokens; answers in OUT/cache cost nothing."
        )
    lines += [f"Note: {n}." for n in est["notes"]]
    return "\n".join(lines)
