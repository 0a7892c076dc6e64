"""Anthropic Messages API (``POST {base_url}/v1/messages``)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from baton.llm.providers.base import post_json
from baton.llm.types import ChatRequest, ChatResponse, ProviderUnavailable, Usage

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096


class AnthropicMessages:
    """Speaks the Messages wire format; system turns go to the ``system`` field."""

    def __init__(
        self, *, name: str, base_url: str, model: str, api_key: str | None, timeout_s: float = 60.0
    ) -> None:
        self.name = name
        self.model = model
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
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        started = time.perf_counter()
        data = await post_json(self._client, self.name, self._url, body, self._headers)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise ProviderUnavailable(f"{self.name}: an answer without content blocks")
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        usage = data.get("usage") or {}
        return ChatResponse(
            text=text,
            model=str(data.get("model") or self.model),
            usage=Usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)))
            if usage
            else None,
            latency_s=time.perf_counter() - started,
            provider=self.name,
            raw=data,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
