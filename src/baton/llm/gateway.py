"""The gateway: the one path of every model call.

cache → provider (retries of transient errors honouring Retry-After, bounded; then the
next configured model) → accounting (tokens, cost from the price table). The exact cache
lives in the store, so every run and worker on the database shares it. Budgets and tier
routing plug in here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import replace

from baton.llm.config import HOSTED, LLMConfig
from baton.llm.prices import PriceBook
from baton.llm.providers.anthropic import AnthropicMessages
from baton.llm.providers.base import Provider
from baton.llm.providers.openai import OpenAIChat
from baton.llm.providers.scripted import RecordingProvider, ScriptedProvider
from baton.llm.types import ChatRequest, ChatResponse, ProviderError, Usage
from baton.store.base import Store

BACKOFF_S = 0.5


def cache_key(model: str, request: ChatRequest) -> str:
    """The exact-cache key: the model asked, the messages and the sampling parameters."""
    canonical = {
        "model": model,
        "messages": [[m.role, m.content] for m in request.messages],
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


class Gateway:
    """Calls models by their configured names."""

    def __init__(self, config: LLMConfig | None = None, store: Store | None = None) -> None:
        self.config = config or LLMConfig()
        self.prices = PriceBook(self.config.prices)
        self.store = store
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
        key = cache_key(first, request) if self._caching(request) else None
        if key is not None:
            hit = await self._cached(key)
            if hit is not None:
                return hit
        response = await self._call(first, request)
        if key is not None:
            await self._remember(key, response)
        return response

    async def _call(self, first: str, request: ChatRequest) -> ChatResponse:
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
                response = self._account(name, response)
                return response if name == first else replace(response, source="fallback")
        assert last is not None
        raise last

    def _account(self, name: str, response: ChatResponse) -> ChatResponse:
        """The response with its cost (from its usage and the price of the model that answered)."""
        if response.usage is None:
            return response
        spec = self.config.models.get(name)
        hint = spec.provider if spec is not None and spec.provider != "scripted" else None
        return replace(response, cost_usd=self.prices.cost_usd(response.model, response.usage, hint))

    def _caching(self, request: ChatRequest) -> bool:
        return self.store is not None and self.config.cache.exact and request.use_cache

    async def _cached(self, key: str) -> ChatResponse | None:
        assert self.store is not None
        text = await self.store.cache_get(key, time.time())
        if text is None:
            return None
        data = json.loads(text)
        usage = data.get("usage")
        return ChatResponse(
            text=data["text"],
            model=data["model"],
            usage=Usage(**usage) if usage else None,
            provider=data.get("provider", ""),
            cost_usd=0.0,
            source="cached",
            raw={"saved_usd": data.get("cost_usd")},
        )

    async def _remember(self, key: str, response: ChatResponse) -> None:
        assert self.store is not None
        value = {
            "text": response.text,
            "model": response.model,
            "provider": response.provider,
            "usage": response.usage.to_dict() if response.usage else None,
            "cost_usd": response.cost_usd,
        }
        now = time.time()
        ttl = self.config.cache.ttl_s
        await self.store.cache_put(key, json.dumps(value), now, now + ttl if ttl is not None else None)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
