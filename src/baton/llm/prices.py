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


class PriceBook:
    """Looks up prices: the user's overrides first, then the maintained table."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._known: dict[tuple[str, str | None], bool] = {}

    def cost_usd(self, model: str, usage: Usage, provider: str | None = None) -> float | None:
        price = self.overrides.get(model)
        if price is not None:
            return (
                usage.input_tokens * price.input_per_mtok + usage.output_tokens * price.output_per_mtok
            ) / 1e6
        if self._known.get((model, provider)) is False:
            return None
        try:
            calc = calc_price(
                PriceUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens),
                model_ref=model,
                provider_id=provider,
            )
        except LookupError:
            self._known[(model, provider)] = False
            return None
        self._known[(model, provider)] = True
        return float(calc.total_price)
