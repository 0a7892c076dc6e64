"""What crosses the gateway: requests, responses, usage, and provider errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from baton.errors import BatonError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One model call. ``step_id`` and ``attempt`` let a cassette answer by step."""

    messages: tuple[Message, ...]
    model: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    step_id: str | None = None
    attempt: int = 1
    #: answer from the exact cache when the same question was asked before
    use_cache: bool = True
    #: let a configured rule answer (on a first attempt) before the cache and the models
    use_rules: bool = True

    @property
    def prompt(self) -> str:
        """The user turns joined: what cassettes match prompts against."""
        return "\n\n".join(m.content for m in self.messages if m.role == "user")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call. ``input_tokens`` counts every input token, those read from the
    provider's prompt cache (``cache_read_tokens``, billed cheaper) and those written to it
    (``cache_write_tokens``, billed dearer by Anthropic) included."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        out = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cache_read_tokens:
            out["cache_read_tokens"] = self.cache_read_tokens
        if self.cache_write_tokens:
            out["cache_write_tokens"] = self.cache_write_tokens
        return out


@dataclass(frozen=True, slots=True)
class ChatResponse:
    text: str
    model: str
    usage: Usage | None = None
    latency_s: float = 0.0
    provider: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    #: what the call cost; None when the model's price is not known
    cost_usd: float | None = None
    #: what produced it: "autonomous" (a rule), "cached", "llm" (the model asked) or
    #: "fallback" (a later or cheaper model than the one asked)
    source: str = "llm"


class ProviderError(BatonError):
    """A model call failed."""

    code = "provider_error"
    #: worth trying again (the same model later, or the next one)
    transient = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class RateLimited(ProviderError):
    """The provider asked to slow down (HTTP 429)."""

    code = "rate_limited"
    transient = True


class ProviderUnavailable(ProviderError):
    """The provider failed on its side (HTTP 5xx, connection refused)."""

    code = "provider_unavailable"
    transient = True


class ProviderTimeout(ProviderError):
    """The provider did not answer in time."""

    code = "provider_timeout"
    transient = True


class ProviderRejected(ProviderError):
    """The provider refused the request (HTTP 4xx other than 429): retrying will not help."""

    code = "provider_rejected"
