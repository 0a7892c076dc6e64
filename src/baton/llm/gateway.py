"""The gateway: the one path of every model call.

Today: provider selection by model name, retries of transient errors honouring
Retry-After (bounded), fallback to the next configured model, and a record of what each
call cost in tokens and time. Budgets, caching and tier routing plug in here.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

from baton.llm.config import HOSTED, LLMConfig
from baton.llm.prices import PriceBook
from baton.llm.providers.anthropic import AnthropicMessages
from baton.llm.providers.base import Provider
from baton.llm.providers.openai import OpenAIChat
from baton.llm.providers.scripted import RecordingProvider, ScriptedProvider
from baton.llm.types import ChatRequest, ChatResponse, ProviderError

BACKOFF_S = 0.5


class Gateway:
    """Calls models by their configured names."""

    def __init__(self, config: LLMConfig | None = None) -> None:
        self.config = config or LLMConfig()
        self.prices = PriceBook(self.config.prices)
        self._providers: dict[str, Provider] = {}

    def problems(self, model: str | None) -> list[str]:
        return self.config.problems(model)

    def _provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            provider = self._build(name)
            self._providers[name] = provider
        return provider

    def _build(self, name: str) -> Provider:
        problems = self.config.problems(name)
        if problems:
            raise ProviderError("; ".join(problems))
        spec = self.config.models[name]
        env = spec.key_env()
        key = os.environ.get(env) if env else None
        model = spec.model or name
        if spec.provider == "scripted":
            assert spec.cassette is not None  # problems() said so
            cassette = self.config.resolve(spec.cassette)
            if spec.record_from is not None:
                return RecordingProvider(name=name, inner=self._provider(spec.record_from), cassette=cassette)
            return ScriptedProvider(name=name, cassette=cassette, model=model)
        base_url = spec.base_url or HOSTED[spec.provider][0]
        if spec.provider == "openai":
            return OpenAIChat(
                name=name, base_url=base_url, model=model, api_key=key, timeout_s=spec.timeout_s
            )
        return AnthropicMessages(
            name=name, base_url=base_url, model=model, api_key=key, timeout_s=spec.timeout_s
        )

    async def complete(self, request: ChatRequest, model: str | None = None) -> ChatResponse:
        """Call ``model`` (or the default), then its fallbacks; the first answer, or the last error."""
        first = model or self.config.default_model
        if first is None:
            raise ProviderError(self.config.problems(None)[0])
        order = [first]
        for name in order:  # grows as fallbacks are discovered
            spec = self.config.models.get(name)
            for fallback in spec.fallbacks if spec is not None else []:
                if fallback not in order:
                    order.append(fallback)
        last: ProviderError | None = None
        for name in order:
            provider = self._provider(name)
            for tries in range(self.config.max_retries + 1):
                try:
                    response = await provider.complete(replace(request, model=name))
                except ProviderError as exc:
                    last = exc
                    if not exc.transient:
                        break
                    if tries < self.config.max_retries:
                        wait = exc.retry_after_s if exc.retry_after_s is not None else BACKOFF_S * 2**tries
                        await asyncio.sleep(min(wait, self.config.max_wait_s))
                    continue
                return self._account(name, response)
        assert last is not None
        raise last

    def _account(self, name: str, response: ChatResponse) -> ChatResponse:
        """The response with its cost (from its usage and the price of the model that answered)."""
        if response.usage is None:
            return response
        spec = self.config.models.get(name)
        hint = spec.provider if spec is not None and spec.provider != "scripted" else None
        return replace(response, cost_usd=self.prices.cost_usd(response.model, response.usage, hint))

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
