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


def estimated(fake: FakeServer, **extra: object) -> LLMConfig:
    """Three tiers, every level routed, no default model: only the estimate picks a model."""
    url = f"{fake.url}/v1"
    return LLMConfig.model_validate(
        {
            "models": {
                "mini": {"provider": "openai", "base_url": url, "model": "gpt-4o-mini"},
                "std": {"provider": "openai", "base_url": url, "model": "gpt-4.1"},
                "big": {"provider": "openai", "base_url": url, "model": "gpt-4o"},
            },
            "tiers": {"cheap": ["mini"], "standard": ["std"], "premium": ["big"]},
            "routing": {"simple": "cheap", "medium": "standard", "complex": "standard", "crisis": "premium"},
            "max_retries": 0,
            **extra,
        }
    )


LABEL = "Label this support ticket as billing, bug or other. Reply with a single word: my invoice is wrong"
REVIEW = (
    "Our payment service is down and the regulator expects a report tonight: "
    "assess in depth what failed, with references to the logs, and what to do first."
)


async def test_a_plan_without_complexity_routes_each_step_by_the_estimate_of_its_prompt(
    fake: FakeServer, tmp_path: Path
) -> None:
    plan = {
        "name": "triage",
        "steps": [
            {"id": "label", "task": "llm.generate", "with": {"prompt": LABEL, "cache": False}},
            {"id": "review", "task": "llm.generate", "with": {"prompt": REVIEW, "cache": False}},
        ],
        "policy": {"max_parallel": 1},
    }
    fake.program({"text": "billing"}, {"text": "Start with the failover."})
    async with Engine(str(tmp_path / "e.db"), llm=estimated(fake)) as engine:
        record = await engine.run(plan)
        attempts = {a.step_id: a for a in await engine.store.get_attempts(record.id)}
    assert record.status is RunStatus.COMPLETED
    assert sorted(r["body"]["model"] for r in fake.received()) == ["gpt-4o", "gpt-4o-mini"]
    label, review = attempts["label"].detail or {}, attempts["review"].detail or {}
    assert (label["model"], label["complexity"]) == ("gpt-4o-mini", "simple")
    assert (review["model"], review["complexity"]) == ("gpt-4o", "crisis")
    assert "answer bounded to a line" in label["complexity_reasons"]
    assert any(r.startswith("much at stake") for r in review["complexity_reasons"])


async def test_a_retry_goes_where_the_first_attempt_went_whatever_its_feedback_says(
    fake: FakeServer, tmp_path: Path
) -> None:
    """The estimate reads the step's prompt, not the rejection fed back into a retry."""
    step = {
        "id": "label",
        "task": "llm.generate",
        "with": {"prompt": "Classify this ticket: my invoice is wrong", "cache": False},
        "validate": [{"kind": "regex", "pattern": "^(billing|bug|other)$"}],
    }
    fake.program({"text": "It is about money."}, {"text": "billing"})
    async with Engine(str(tmp_path / "r.db"), llm=estimated(fake)) as engine:
        record = await engine.run({"name": "retry", "steps": [step]})
    assert record.status is RunStatus.COMPLETED
    bodies = [r["body"] for r in fake.received()]
    assert "previous answer was rejected" in bodies[1]["messages"][-1]["content"]
    assert [b["model"] for b in bodies] == ["gpt-4o-mini", "gpt-4o-mini"]


async def test_a_direct_call_is_estimated_too_and_a_given_complexity_or_tier_wins(fake: FakeServer) -> None:
    gateway = Gateway(estimated(fake))
    try:
        fake.program({"text": "a"}, {"text": "b"}, {"text": "c"})
        asked = ChatRequest(messages=(Message("user", REVIEW),), use_cache=False)
        first = await gateway.complete(asked)
        await gateway.complete(asked, complexity="simple")
        await gateway.complete(asked, tier="standard")
    finally:
        await gateway.aclose()
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o", "gpt-4o-mini", "gpt-4.1"]
    assert first.raw["complexity"] == "crisis"


async def test_with_the_estimate_off_an_unlabelled_call_goes_to_the_default_model(fake: FakeServer) -> None:
    gateway = Gateway(estimated(fake, estimate_complexity=False, default_model="std"))
    try:
        fake.program({"text": "a"})
        response = await gateway.complete(ChatRequest(messages=(Message("user", REVIEW),), use_cache=False))
    finally:
        await gateway.aclose()
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4.1"]
    assert "complexity" not in response.raw
