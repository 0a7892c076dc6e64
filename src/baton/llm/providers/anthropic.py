"""Anthropic Messages API (``POST {base_url}/v1/messages``)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from baton.llm import tokens
from baton.llm.providers.base import post_json
from baton.llm.types import ChatRequest, ChatResponse, ProviderUnavailable, Usage

API_VERSION = "2023-06-01"
#: Anthropic caches prompts from this many tokens (1,024 for most models; shorter ones
#: are sent as they are)
CACHE_MIN_TOKENS = 1024
DEFAULT_MAX_TOKENS = 4096


class AnthropicMessages:
    """Speaks the Messages wire format; system turns go to the ``system`` field."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float = 60.0,
        prompt_cache: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        #: mark long system prompts for Anthropic's prompt cache (cache_control)
        self.prompt_cache = prompt_cache
        self._url = base_url.rstrip("/") + "/v1/messages"
        self._headers = {"anthropic-version": API_VERSION}
        if api_key:
            self._headers["x-api-key"] = api_key
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": [
                {"role": m.role, "content": m.content} for m in request.messages if m.role != "system"
            ],
        }
        if system and self.prompt_cache and tokens.count(system) >= CACHE_MIN_TOKENS:
            # a long system prompt, asked again and again: read from the provider's cache
            body["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        elif system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        started = time.perf_counter()
        data = await post_json(self._client, self.name, self._url, body, self._headers)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise ProviderUnavailable(f"{self.name}: an answer without content blocks")
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        return ChatResponse(
            text=text,
            model=str(data.get("model") or self.model),
            usage=_usage(data.get("usage")),
            latency_s=time.perf_counter() - started,
            provider=self.name,
            raw=data,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _usage(usage: Any) -> Usage | None:
    """Anthropic's usage: input_tokens counts neither the tokens read from the prompt cache
    nor those written to it; Usage's input_tokens counts them all."""
    if not isinstance(usage, dict) or not usage:
        return None
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    fresh = int(usage.get("input_tokens") or 0)
    return Usage(fresh + read + written, int(usage.get("output_tokens") or 0), read, written)
