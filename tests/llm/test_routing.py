"""Routing by tier and complexity, downgrades when the budget runs low, cooldowns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from baton import Engine, RunStatus
from baton.errors import UsageError
from baton.llm import ChatRequest, Gateway, LLMConfig, Message
from baton.llm.gateway import BudgetGuard
from baton.plan.model import Budget
from baton.store import BudgetSettle, MemoryStore
from tests.llm.conftest import FakeServer


def tiered(fake: FakeServer, **extra: object) -> LLMConfig:
    url = f"{fake.url}/v1"
    return LLMConfig.model_validate(
        {
            "models": {
                "mini": {"provider": "openai", "base_url": url, "model": "gpt-4o-mini"},
                "local": {"provider": "openai", "base_url": url, "model": "qwen-local"},
                "big": {"provider": "openai", "base_url": url, "model": "gpt-4o"},
            },
            "tiers": {"cheap": ["mini", "local"], "premium": ["big"]},
            "routing": {"simple": "cheap", "complex": "premium"},
            "max_retries": 0,
            **extra,
        }
    )


def ask() -> ChatRequest:
    return ChatRequest(messages=(Message("user", "hello"),), use_cache=False)


async def test_the_plan_complexity_picks_the_tier(fake: FakeServer, tmp_path: Path) -> None:
    step = {"id": "ask", "task": "llm.generate", "with": {"prompt": "Hi?", "cache": False}}
    models = []
    for complexity in ("simple", "complex"):
        fake.program({"text": "ok"})
        async with Engine(str(tmp_path / f"{complexity}.db"), llm=tiered(fake)) as engine:
            record = await engine.run({"name": "r", "policy": {"complexity": complexity}, "steps": [step]})
            assert record.status is RunStatus.COMPLETED
        models += [r["body"]["model"] for r in fake.received()]
    assert models == ["gpt-4o-mini", "gpt-4o"]


async def test_a_run_that_spent_most_of_its_budget_moves_a_tier_down(fake: FakeServer) -> None:
    store = MemoryStore()
    local_is_free = {"qwen-local": {"input_per_mtok": 0, "output_per_mtok": 0}}
    gateway = Gateway(tiered(fake, prices=local_is_free), store)
    guard = BudgetGuard("r1", "s", run=Budget(usd=1.0))
    try:
        fake.program({"text": "a"}, {"text": "b"})
        first = await gateway.complete(ask(), budget=guard, tier="premium")
        await store.budget_settle("r1", [BudgetSettle("run", 0, 0.0, 1000, 0.85)])  # 85% spent
        second = await gateway.complete(ask(), budget=guard, tier="premium")
    finally:
        await gateway.aclose()
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o", "gpt-4o-mini"]
    assert (first.raw["budget"], second.raw["budget"]) == ("within", "downgraded")


async def test_a_failing_model_cools_down_and_is_skipped(fake: FakeServer) -> None:
    gateway = Gateway(tiered(fake, cooldown_s=60))
    try:
        fake.program({"status": 503}, {"text": "from local"}, {"text": "local again"})
        first = await gateway.complete(ask(), tier="cheap")
        second = await gateway.complete(ask(), tier="cheap")
    finally:
        await gateway.aclose()
    assert (first.text, first.source) == ("from local", "fallback")
    assert second.text == "local again"
    # mini failed once and was not asked again while it cooled down.
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o-mini", "qwen-local", "qwen-local"]


async def test_when_every_model_cools_down_the_call_waits_rather_than_fails(fake: FakeServer) -> None:
    gateway = Gateway(tiered(fake, cooldown_s=0.5))
    try:
        fake.program({"status": 500})
        with pytest.raises(Exception, match="HTTP 500"):
            await gateway.complete(ask(), model="big")
        started = time.monotonic()  # the cool-down began a moment ago (programming takes time)
        fake.program({"text": "recovered"})
        answer = await gateway.complete(ask(), model="big")
    finally:
        await gateway.aclose()
    assert answer.text == "recovered"
    assert time.monotonic() - started >= 0.4


def test_tiers_and_routes_must_name_configured_things(tmp_path: Path) -> None:
    path = tmp_path / "llm.yaml"
    path.write_text("models: {a: {provider: openai, base_url: 'http://x/v1'}}\ntiers: {cheap: [a, b]}\n")
    with pytest.raises(UsageError, match="tier 'cheap' lists model 'b', which is not configured"):
        LLMConfig.load(path)
    path.write_text("models: {a: {provider: openai, base_url: 'http://x/v1'}}\nrouting: {simple: cheap}\n")
    with pytest.raises(UsageError, match="routing sends 'simple' to tier 'cheap', which is not configured"):
        LLMConfig.load(path)
