"""The semantic cache with a verifier (cache.semantic.verify): each match is put to a cheap
model first, whose call costs what it costs; against a real HTTP server process."""

from __future__ import annotations

import pytest

from baton.llm import ChatRequest, Gateway, LLMConfig, Message
from baton.store import MemoryStore
from tests.llm.conftest import FakeServer

pytest.importorskip("sentence_transformers", reason="the semantic extra is not installed")


def config(fake: FakeServer) -> LLMConfig:
    url = f"{fake.url}/v1"
    return LLMConfig.model_validate(
        {
            "default_model": "big",
            "models": {
                "big": {"provider": "openai", "base_url": url, "model": "gpt-4o"},
                "mini": {"provider": "openai", "base_url": url, "model": "gpt-4o-mini"},
            },
            "tiers": {"cheap": ["mini"], "premium": ["big"]},
            "cache": {"semantic": {"verify": "cheap"}},
        }
    )


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=(Message("user", text),), temperature=0.0)


async def test_a_match_the_verifier_confirms_is_served_and_its_check_paid_for(fake: FakeServer) -> None:
    gateway = Gateway(config(fake), MemoryStore())
    fake.program({"text": "Paris."}, {"text": "yes"})
    try:
        first = await gateway.complete(ask("What is the capital of France?"))
        second = await gateway.complete(ask("What's the capital city of France?"))
    finally:
        await gateway.aclose()
    asked = [r["body"] for r in fake.received()]
    assert [b["model"] for b in asked] == ["gpt-4o", "gpt-4o-mini"]  # the check went to the cheap tier
    assert "Request A: What is the capital of France?" in asked[1]["messages"][0]["content"]
    assert (second.text, second.source, second.raw["cache"]) == ("Paris.", "cached", "semantic")
    assert second.raw["verified_by"] == "gpt-4o-mini"
    assert second.cost_usd is not None and 0 < second.cost_usd < (first.cost_usd or 0)


async def test_a_match_the_verifier_refuses_goes_to_the_model(fake: FakeServer) -> None:
    gateway = Gateway(config(fake), MemoryStore())
    fake.program({"text": "Paris."}, {"text": "No."}, {"text": "Paris, still."})
    try:
        await gateway.complete(ask("What is the capital of France?"))
        second = await gateway.complete(ask("What's the capital city of France?"))
    finally:
        await gateway.aclose()
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o", "gpt-4o-mini", "gpt-4o"]
    assert (second.text, second.source) == ("Paris, still.", "llm")
    assert second.raw["refused_matches"] == 1 and second.raw["verify_cost_usd"] > 0
    model_only = (13 * 2.5 + 5 * 10.0) / 1e6  # gpt-4o: the fake server's usage, 13 in, 5 out
    assert second.cost_usd == pytest.approx(model_only + second.raw["verify_cost_usd"])


def test_a_verifier_that_is_not_configured_is_a_problem() -> None:
    bad = LLMConfig.model_validate(
        {
            "default_model": "m",
            "models": {"m": {"provider": "openai", "base_url": "http://x/v1"}},
            "cache": {"semantic": {"verify": "cheap"}},
        }
    )
    assert "cache.semantic.verify: 'cheap' is neither a configured model nor a tier" in bad.problems(None)
