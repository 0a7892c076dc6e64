"""Providers and the gateway against a real HTTP server process."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from baton.errors import UsageError
from baton.llm import ChatRequest, Gateway, LLMConfig, Message
from baton.llm.providers.base import retry_after_s
from baton.llm.types import ProviderRejected, ProviderUnavailable, RateLimited
from tests.llm.conftest import FakeServer


def config(fake: FakeServer, **models: dict[str, object]) -> LLMConfig:
    return LLMConfig.model_validate({"default_model": next(iter(models)), "models": models, "max_wait_s": 5})


def ask(text: str = "Say hi", **fields: object) -> ChatRequest:
    return ChatRequest(messages=(Message("system", "Be brief."), Message("user", text)), **fields)  # type: ignore[arg-type]


async def test_openai_compatible_call(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    gateway = Gateway(
        config(
            fake,
            small={
                "provider": "openai",
                "base_url": f"{fake.url}/v1",
                "model": "m-1",
                "api_key_env": "FAKE_KEY",
            },
        )
    )
    fake.program({"text": "hi there"})
    try:
        answer = await gateway.complete(ask(temperature=0.5, max_tokens=20))
    finally:
        await gateway.aclose()
    assert (answer.text, answer.model, answer.provider) == ("hi there", "m-1", "small")
    assert answer.usage is not None and answer.usage.to_dict() == {"input_tokens": 13, "output_tokens": 5}
    (request,) = fake.received()
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"] == {
        "model": "m-1",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
        "temperature": 0.5,
        "max_tokens": 20,
    }


async def test_anthropic_messages_call(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ANTHROPIC", "ak-test")
    gateway = Gateway(
        config(
            fake,
            claude={
                "provider": "anthropic",
                "base_url": fake.url,
                "model": "c-3",
                "api_key_env": "FAKE_ANTHROPIC",
            },
        )
    )
    fake.program({"text": "hello"})
    try:
        answer = await gateway.complete(ask(temperature=0.3))
    finally:
        await gateway.aclose()
    assert answer.text == "hello"
    assert answer.usage is not None and answer.usage.to_dict() == {"input_tokens": 11, "output_tokens": 7}
    (request,) = fake.received()
    assert request["path"] == "/v1/messages"
    assert request["headers"]["x-api-key"] == "ak-test"
    assert request["headers"]["anthropic-version"] == "2023-06-01"
    assert request["body"]["system"] == "Be brief."
    assert request["body"]["messages"] == [{"role": "user", "content": "Say hi"}]
    assert request["body"]["temperature"] == 0.3


async def test_a_429_is_retried_after_the_time_it_asks_for(fake: FakeServer) -> None:
    gateway = Gateway(config(fake, local={"provider": "openai", "base_url": f"{fake.url}/v1"}))
    fake.program({"status": 429, "headers": {"Retry-After": "1"}}, {"text": "after the wait"})
    started = time.monotonic()
    try:
        answer = await gateway.complete(ask())
    finally:
        await gateway.aclose()
    assert answer.text == "after the wait"
    assert time.monotonic() - started >= 0.9
    assert len(fake.received()) == 2


async def test_a_failing_model_falls_back_to_the_next(fake: FakeServer) -> None:
    gateway = Gateway(
        LLMConfig.model_validate(
            {
                "default_model": "primary",
                "max_retries": 1,
                "max_wait_s": 0.05,
                "models": {
                    "primary": {
                        "provider": "openai",
                        "base_url": f"{fake.url}/v1",
                        "model": "p",
                        "fallbacks": ["backup"],
                    },
                    "backup": {
                        "provider": "anthropic",
                        "base_url": fake.url,
                        "model": "b",
                        "api_key_env": "PATH",
                    },
                },
            }
        )
    )
    fake.program({"status": 500}, {"status": 503}, {"text": "from the backup"})
    try:
        answer = await gateway.complete(ask())
    finally:
        await gateway.aclose()
    assert (answer.text, answer.provider) == ("from the backup", "backup")
    assert [r["body"]["model"] for r in fake.received()] == ["p", "p", "b"]


async def test_a_timeout_falls_back_and_the_last_error_is_raised_when_all_fail(fake: FakeServer) -> None:
    models = {
        "slow": {
            "provider": "openai",
            "base_url": f"{fake.url}/v1",
            "timeout_s": 0.3,
            "fallbacks": ["broken"],
        },
        "broken": {"provider": "openai", "base_url": f"{fake.url}/v1"},
    }
    gateway = Gateway(LLMConfig.model_validate({"default_model": "slow", "max_retries": 0, "models": models}))
    fake.program(
        {"delay_s": 1.0, "text": "too late"}, {"status": 400, "body": {"error": {"message": "bad request"}}}
    )
    try:
        with pytest.raises(ProviderRejected, match=r"HTTP 400 .*bad request"):
            await gateway.complete(ask())
    finally:
        await gateway.aclose()


async def test_errors_say_what_happened() -> None:
    gateway = Gateway(
        LLMConfig.model_validate(
            {
                "default_model": "gone",
                "max_retries": 0,
                "models": {"gone": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1"}},
            }
        )
    )
    try:
        with pytest.raises(
            ProviderUnavailable, match=re.escape("cannot reach http://127.0.0.1:1/v1/chat/completions")
        ):
            await gateway.complete(ask())
    finally:
        await gateway.aclose()


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_s("soon") is None
    assert retry_after_s(None) is None
    assert RateLimited("x", retry_after_s=2).transient


def test_config_problems_name_the_model_and_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "llm.yaml"
    path.write_text(
        "default_model: gpt\n"
        "models:\n"
        "  gpt: {provider: openai, model: gpt-4o-mini, fallbacks: [replay, nowhere]}\n"
        "  replay: {provider: scripted, cassette: missing.yaml}\n"
    )
    problems = LLMConfig.load(path).problems(None)
    assert problems == [
        "model 'gpt' needs its API key in $OPENAI_API_KEY, which is not set",
        f"model 'replay': cassette {tmp_path / 'missing.yaml'} does not exist",
        "model 'nowhere' is not configured (configured: gpt, replay)",
    ]
    path.write_text("models:\n  x: {provider: openia}\n")
    with pytest.raises(
        UsageError, match=r"LLM config .*llm.yaml: models.x.provider: Input should be 'openai'"
    ):
        LLMConfig.load(path)
    with pytest.raises(UsageError, match="does not exist"):
        LLMConfig.load(tmp_path / "nope.yaml")


async def test_calls_are_priced_from_the_maintained_table_or_the_config(tmp_path: Path) -> None:
    cassette = tmp_path / "c.yaml"
    cassette.write_text(
        "responses:\n  - {text: hi, usage: {input_tokens: 1000000, output_tokens: 1000000}}\n"
    )
    gateway = Gateway(
        LLMConfig.model_validate(
            {
                "models": {
                    "mini": {"provider": "scripted", "model": "gpt-4o-mini", "cassette": str(cassette)},
                    "house": {"provider": "scripted", "model": "house-model", "cassette": str(cassette)},
                    "mystery": {"provider": "scripted", "model": "mystery-model", "cassette": str(cassette)},
                },
                "prices": {"house-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
            }
        )
    )
    try:
        mini = await gateway.complete(ask(), "mini")
        house = await gateway.complete(ask(), "house")
        mystery = await gateway.complete(ask(), "mystery")
    finally:
        await gateway.aclose()
    assert mini.cost_usd == pytest.approx(0.15 + 0.60)  # genai-prices: $0.15 / $0.60 per MTok
    assert house.cost_usd == pytest.approx(3.0)
    assert mystery.cost_usd is None


async def test_prompt_cache_tokens_are_priced_as_the_providers_bill_them(fake: FakeServer) -> None:
    """OpenAI counts cached tokens inside prompt_tokens (billed at half on gpt-4o-mini);
    Anthropic counts cache reads and writes apart from input_tokens (a tenth, and 1.25x)."""
    gateway = Gateway(
        config(
            fake,
            mini={"provider": "openai", "base_url": f"{fake.url}/v1", "model": "gpt-4o-mini"},
            haiku={"provider": "anthropic", "base_url": fake.url, "model": "claude-3-5-haiku-latest"},
        )
    )
    cached = {
        "prompt_tokens": 10_000,
        "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 8_000},
    }
    anthropic = {
        "input_tokens": 1_000,
        "cache_read_input_tokens": 8_000,
        "cache_creation_input_tokens": 1_000,
        "output_tokens": 0,
    }
    fake.program(
        {"usage": cached}, {"usage": {"prompt_tokens": 10_000, "completion_tokens": 0}}, {"usage": anthropic}
    )
    try:
        with_cache = await gateway.complete(ask(), "mini")
        without = await gateway.complete(ask("Again"), "mini")
        claude = await gateway.complete(ask(), "haiku")
    finally:
        await gateway.aclose()
    assert with_cache.usage is not None and with_cache.usage.to_dict() == {
        "input_tokens": 10_000,
        "output_tokens": 0,
        "cache_read_tokens": 8_000,
    }
    # gpt-4o-mini: $0.15 per million input tokens, cached ones $0.075
    assert without.cost_usd == pytest.approx(10_000 * 0.15e-6)
    assert with_cache.cost_usd == pytest.approx(2_000 * 0.15e-6 + 8_000 * 0.075e-6)
    assert with_cache.raw["prompt_cache_saved_usd"] == pytest.approx(8_000 * 0.075e-6)
    # claude-3-5-haiku: $0.80 input, $0.08 cache reads, $1.00 cache writes
    assert claude.usage is not None and (claude.usage.input_tokens, claude.usage.cache_write_tokens) == (
        10_000,
        1_000,
    )
    assert claude.cost_usd == pytest.approx(1_000 * 0.8e-6 + 8_000 * 0.08e-6 + 1_000 * 1.0e-6)


async def test_anthropic_prompt_cache_marks_long_system_prompts_when_asked(fake: FakeServer) -> None:
    models = {
        "cached": {
            "provider": "anthropic",
            "base_url": fake.url,
            "model": "claude-3-5-haiku-latest",
            "prompt_cache": True,
        },
        "plain": {"provider": "anthropic", "base_url": fake.url, "model": "claude-3-5-haiku-latest"},
    }
    gateway = Gateway(config(fake, **models))
    long_system = "You review code for a bank. " * 300  # well over 1,024 tokens
    request = ChatRequest(messages=(Message("system", long_system), Message("user", "Review this.")))
    fake.program({}, {}, {})
    try:
        await gateway.complete(request, "cached")
        await gateway.complete(request, "plain")
        await gateway.complete(ask(), "cached")  # a short system prompt: sent as it is
    finally:
        await gateway.aclose()
    marked, plain, short = (r["body"]["system"] for r in fake.received())
    assert marked == [{"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}]
    assert plain == long_system and short == "Be brief."
