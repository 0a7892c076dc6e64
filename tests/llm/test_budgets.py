"""Budgets hold: parallel model calls reserve before they go out and settle after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from baton import Engine, RunStatus
from baton.llm import LLMConfig
from baton.metrics import Metrics
from tests.llm.conftest import FakeServer


def engine_config(fake: FakeServer, **extra: Any) -> LLMConfig:
    models = {
        "mini": {"provider": "openai", "base_url": f"{fake.url}/v1", "model": "gpt-4o-mini"},
        "premium": {
            "provider": "openai",
            "base_url": f"{fake.url}/v1",
            "model": "gpt-4o",
            "fallbacks": ["mini"],
        },
        "mystery": {"provider": "openai", "base_url": f"{fake.url}/v1", "model": "house-model-x"},
    }
    return LLMConfig.model_validate({"default_model": "mini", "models": models, **extra})


def parallel_plan(n: int, budget: dict[str, Any], model: str = "mini") -> dict[str, Any]:
    return {
        "name": "fanout",
        "budget": budget,
        "policy": {"max_parallel": n},
        "steps": [
            {
                "id": f"q{i}",
                "task": "llm.generate",
                "with": {"prompt": f"Question {i}?", "model": model, "cache": False},
            }
            for i in range(n)
        ],
    }


@pytest.mark.parametrize("budget", [{"tokens": 4000}, {"usd": 0.002}])
async def test_twenty_parallel_steps_never_spend_over_the_run_budget(
    fake: FakeServer, tmp_path: Path, budget: dict[str, Any]
) -> None:
    fake.program(*[{"delay_s": 0.2, "text": f"answer {i}"} for i in range(20)])
    async with Engine(str(tmp_path / "b.db"), llm=engine_config(fake)) as engine:
        record = await engine.run(parallel_plan(20, budget))
        steps = await engine.store.get_steps(record.id)
        (ledger,) = await engine.store.budget_ledger(record.id)
        attempts = await engine.store.get_attempts(record.id)
    succeeded = [s for s in steps if s.status.value == "succeeded"]
    refused = [s for s in steps if s.status.value == "failed"]
    # Each call reserves its worst case (input estimate + 1024 output tokens, at gpt-4o-mini's
    # price) while it is out, so only a few run at once; the rest are refused.
    assert succeeded and refused
    assert all("budget" in (s.error or "") for s in refused)
    assert len(fake.received()) == len(succeeded)
    assert ledger.reserved_tokens == 0 and ledger.reserved_usd == pytest.approx(0, abs=1e-12)
    if "tokens" in budget:
        assert ledger.spent_tokens <= budget["tokens"]
    else:
        assert ledger.spent_usd <= budget["usd"]
    spent = sum(
        a.detail["usage"]["input_tokens"] + a.detail["usage"]["output_tokens"]
        for a in attempts
        if a.detail and a.detail.get("usage")
    )
    assert ledger.spent_tokens == spent == 18 * len(succeeded)  # the fake server's usage: 13 + 5
    assert record.status is RunStatus.FAILED


async def test_a_step_budget_sends_the_call_to_a_cheaper_model_when_it_says_so(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.program({"text": "cheap answer"})
    plan = {
        "name": "cheaper",
        "steps": [
            {
                "id": "ask",
                "task": "llm.generate",
                "with": {"prompt": "Explain baton.", "model": "premium"},
                "budget": {"usd": 0.005, "on_exhausted": "cheaper"},
            }
        ],
    }
    async with Engine(str(tmp_path / "b.db"), llm=engine_config(fake)) as engine:
        metrics = Metrics(engine)
        record = await engine.run(plan)
        (step,) = await engine.store.get_steps(record.id)
        (attempt,) = await engine.store.get_attempts(record.id)
        metrics.close()
    assert record.status is RunStatus.COMPLETED
    # gpt-4o's worst case (~$0.01) does not fit $0.005; gpt-4o-mini's (~$0.0006) does.
    assert (step.output["model"], step.output["source"]) == ("gpt-4o-mini", "fallback")
    # The decision is on the attempt's record and in the metrics, from the step's event.
    assert attempt.detail is not None and attempt.detail["budget"] == "downgraded"
    assert metrics.registry.get_sample_value("baton_budget_decisions_total", {"decision": "downgraded"}) == 1
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o-mini"]


async def test_a_usd_budget_needs_known_prices(fake: FakeServer, tmp_path: Path) -> None:
    plan = parallel_plan(1, {"usd": 1.0}, model="mystery")
    async with Engine(str(tmp_path / "b.db"), llm=engine_config(fake)) as engine:
        record = await engine.run(plan)
        (step,) = await engine.store.get_steps(record.id)
    assert record.status is RunStatus.FAILED
    assert step.error is not None and "the price of model 'mystery' (or a fallback) is unknown" in step.error
    assert fake.received() == []
