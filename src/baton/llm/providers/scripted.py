"""The scripted provider: answers from a cassette file, no network.

The embedded default for demos and tests. A cassette lists responses; a call takes the
first one whose matchers all fit (``step``, ``attempt``, ``model``, ``prompt`` as a regular
expression). A response is a ``text`` (with optional ``usage`` and ``latency_s``) or an
``error`` to inject (``status`` 429/5xx/4xx or ``timeout``, optional ``retry_after_s``)::

    responses:
      - {step: spec, text: "A spec ..."}
      - {step: code, attempt: 1, text: "def f(:"}       # a wrong first answer
      - {step: code, text: "def f():\\n    return 1"}
      - {prompt: "(?i)summari[sz]e", text: "...", usage: {input_tokens: 40, output_tokens: 12}}

:class:`RecordingProvider` calls a real provider and appends what it answered to a
cassette, so a run can be replayed later without the network.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from baton.errors import UsageError
from baton.llm import tokens
from baton.llm.providers.base import Provider
from baton.llm.types import (
    ChatRequest,
    ChatResponse,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Usage,
)


class InjectedError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: int | Literal["timeout"]
    message: str = "injected by the cassette"
    retry_after_s: float | None = Field(default=None, ge=0)


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str | None = None
    attempt: int | None = Field(default=None, ge=1)
    model: str | None = None
    prompt: str | None = None
    text: str | None = None
    error: InjectedError | None = None
    usage: dict[str, int] | None = None
    latency_s: float = Field(default=0.0, ge=0)

    @field_validator("prompt")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            re.compile(value)
        return value

    def matches(self, request: ChatRequest) -> bool:
        return (
            (self.step is None or self.step == request.step_id)
            and (self.attempt is None or self.attempt == request.attempt)
            and (self.model is None or self.model == request.model)
            and (self.prompt is None or re.search(self.prompt, request.prompt) is not None)
        )


class Cassette(BaseModel):
    model_config = ConfigDict(extra="forbid")
    responses: list[Entry] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Cassette:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UsageError(f"cassette {path} does not exist") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cassette {path} cannot be read: {exc}") from None
        try:
            cassette = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"cassette {path}: {where}: {first['msg']}") from None
        for i, entry in enumerate(cassette.responses):
            if (entry.text is None) == (entry.error is None):
                raise UsageError(f"cassette {path}: responses[{i}] needs exactly one of text or error")
        return cassette


def estimate_tokens(text: str) -> int:
    """What a response that declares no usage counts: the text's tokens (cl100k)."""
    return tokens.count(text)


class ScriptedProvider:
    """Answers from a cassette."""

    def __init__(self, *, name: str, cassette: Path, model: str | None = None) -> None:
        self.name = name
        self.model = model or name
        self.path = cassette
        self.cassette = Cassette.load(cassette)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        entry = next((e for e in self.cassette.responses if e.matches(request)), None)
        if entry is None:
            raise ProviderRejected(
                f"{self.name}: no response in {self.path} matches step {request.step_id!r} "
                f"attempt {request.attempt} (prompt starts {request.prompt[:60]!r})"
            )
        if entry.latency_s:
            await asyncio.sleep(entry.latency_s)
        if entry.error is not None:
            raise _injected(self.name, entry.error)
        text = entry.text or ""
        if entry.usage is not None:
            usage = Usage(int(entry.usage.get("input_tokens", 0)), int(entry.usage.get("output_tokens", 0)))
            estimated = False
        else:
            usage = Usage(estimate_tokens(request.prompt), estimate_tokens(text))
            estimated = True
        return ChatResponse(
            text=text,
            model=self.model,
            usage=usage,
            latency_s=entry.latency_s,
            provider=self.name,
            raw={"usage_estimated": estimated},
        )

    async def aclose(self) -> None:
        return None


def _injected(provider: str, error: InjectedError) -> ProviderError:
    message = f"{provider}: {error.message}"
    if error.status == "timeout":
        return ProviderTimeout(message)
    kind: type[ProviderError]
    if error.status == 429:
        kind = RateLimited
    elif error.status >= 500:
        kind = ProviderUnavailable
    else:
        kind = ProviderRejected
    return kind(message, status=error.status, retry_after_s=error.retry_after_s)


class RecordingProvider:
    """Calls ``inner`` and appends each answer to a cassette (created if missing)."""

    def __init__(self, *, name: str, inner: Provider, cassette: Path) -> None:
        self.name = name
        self.inner = inner
        self.path = cassette
        self._lock = asyncio.Lock()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        response = await self.inner.complete(request)
        entry: dict[str, Any] = {"step": request.step_id, "attempt": request.attempt, "text": response.text}
        if response.usage is not None:
            entry["usage"] = response.usage.to_dict()
        async with self._lock:
            data: dict[str, Any] = {"responses": []}
            if self.path.exists():
                data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {"responses": []}
            data.setdefault("responses", []).append(entry)
            _write_atomically(self.path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = ["Cassette", "RecordingProvider", "ScriptedProvider", "estimate_tokens"]
