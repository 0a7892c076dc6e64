"""OpenAI-compatible chat completions: OpenAI, vLLM, Ollama, llama.cpp server and the
many hosted APIs that speak the same wire format (``POST {base_url}/chat/completions``)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from baton.llm.providers.base import post_json
from baton.llm.types import ChatRequest, ChatResponse, ProviderUnavailable, Usage


class OpenAIChat:
    """Speaks the chat-completions wire format to one endpoint."""

    def __init__(
        self, *, name: str, base_url: str, model: str, api_key: str | None, timeout_s: float = 60.0
    ) -> None:
        self.name = name
        self.model = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        started = time.perf_counter()
        data = await post_json(self._client, self.name, self._url, body, self._headers)
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ProviderUnavailable(f"{self.name}: an answer without choices[0].message.content") from None
        return ChatResponse(
            text=str(text),
            model=str(data.get("model") or self.model),
            usage=_usage(data.get("usage")),
            latency_s=time.perf_counter() - started,
            provider=self.name,
            raw=data,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _usage(usage: Any) -> Usage | None:
    """OpenAI's usage: prompt_tokens counts the cached ones (prompt_tokens_details)."""
    if not isinstance(usage, dict) or not usage:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0)
    )
