"""What an LLM answer costs: ``llm.prices`` (USD per million prompt and completion tokens)."""

from __future__ import annotations

import logging

from raypipe.errors import ConfigError

log = logging.getLogger(__name__)


def price_of(prices: dict[str, tuple[float, float]], model: str) -> tuple[float, float] | None:
    """Exact match first, else the longest price key the model name starts with."""
    if model in prices:
        return prices[model]
    matches = [k for k in prices if model.startswith(k)]
    return prices[max(matches, key=len)] if matches else None


def price_or_zero(prices: dict[str, tuple[float, float]], model: str) -> tuple[float, float]:
    """The model's price; (0, 0), with a warning, for a model without one."""
    price = price_of(prices, model)
    if price is None:
        log.warning(
            "no price for model %r in llm.prices: its cost is reported as 0 USD. Add "
            "llm.prices.%s=[prompt, completion] (USD per million tokens) to count it.",
            model,
            model,
        )
    return price or (0.0, 0.0)


def cost_usd(price: tuple[float, float], prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


def require_price(prices: dict[str, tuple[float, float]], model: str, what: str) -> None:
    """A budget (``what``, e.g. ``max_usd``) needs a price: without one every answer
    would count as 0 USD and the budget would never stop the run.

    Raises:
        ConfigError: naming the ``llm.prices.<model>`` entry to add.
    """
    if price_of(prices, model) is None:
        raise ConfigError(
            f"{what} is set but model {model!r} has no price in llm.prices, so its answers "
            f"would count as 0 USD and {what} could never stop the run: add "
            f"llm.prices.{model}=[prompt, completion] (USD per million tokens, from the "
            f"provider's price page), or unset {what}."
        )
