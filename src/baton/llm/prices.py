"""What a model call cost, in USD.

Prices come from ``genai-prices`` (a maintained table that ships its data in the package,
so it works offline); the LLM config's ``prices:`` overrides or adds models (USD per
million tokens). A model found in neither has no cost: it is reported as unknown, never
guessed.
"""

from __future__ import annotations

from collections.abc import Mapping

from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from pydantic import BaseModel, ConfigDict, Field

from baton.llm.types import Usage


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    #: input tokens read from the provider's prompt cache, and written to it (default: the
    #: input price)
    cache_read_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)


class PriceBook:
    """Looks up prices: the user's overrides first, then the maintained table."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._known: dict[tuple[str, str | None], bool] = {}

    def cost_usd(self, model: str, usage: Usage, provider: str | None = None) -> float | None:
        """What ``usage`` costs on ``model``: cache reads and writes at their own prices."""
        price = self.overrides.get(model)
        if price is not None:
            read, written = usage.cache_read_tokens, usage.cache_write_tokens
            fresh = max(0, usage.input_tokens - read - written)
            read_price = (
                price.cache_read_per_mtok if price.cache_read_per_mtok is not None else price.input_per_mtok
            )
            write_price = (
                price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
            )
            return (
                fresh * price.input_per_mtok
                + read * read_price
                + written * write_price
                + usage.output_tokens * price.output_per_mtok
            ) / 1e6
        if self._known.get((model, provider)) is False:
            return None
        try:
            calc = calc_price(
                PriceUsage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cache_read_tokens=usage.cache_read_tokens or None,
                    cache_write_tokens=usage.cache_write_tokens or None,
                ),
                model_ref=model,
                provider_id=provider,
            )
        except LookupError:
            self._known[(model, provider)] = False
            return None
        self._known[(model, provider)] = True
        return float(calc.total_price)

    def cache_saving_usd(self, model: str, usage: Usage, provider: str | None = None) -> float | None:
        """What the provider's prompt cache saved on ``usage``: its cost with every input
        token at the full input price, less its cost (None: no cache tokens, or no price)."""
        if not usage.cache_read_tokens and not usage.cache_write_tokens:
            return None
        actual = self.cost_usd(model, usage, provider)
        full = self.cost_usd(model, Usage(usage.input_tokens, usage.output_tokens), provider)
        return None if actual is None or full is None else full - actual
