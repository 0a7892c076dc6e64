"""Budgets hold: parallel model calls reserve before they go out and settle after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def reservation(engine: Engine, prompt: str, max_tokens: int) -> int:
    """What one call of ``parallel_plan`` reserves: its prompt's estimate and max_tokens."""
    from baton.llm import tokens
    from baton.llm.types import Message

    return tokens.estimate_messages((Message("user", prompt),), "gpt-4o-mini") + max_tokens


async def _fan_out(fake: FakeServer, tmp_path: Path, share: float, budget_of: float) -> dict[str, Any]:
    """20 parallel steps of max_tokens 1000 under a run budget of ``budget_of`` full
    reservations, the server using ``share`` of max_tokens: what happened."""
    fake.program(*[{"delay_s": 0.2, "output_share": share} for _ in range(20)])
    async with Engine(str(tmp_path / f"b{share}.db"), llm=engine_config(fake)) as engine:
        one = reservation(engine, "Question 10?", 1000)
        budget = int(budget_of * one)
        plan = parallel_plan(20, {"tokens": budget})
        for step in plan["steps"]:
            step["with"]["max_tokens"] = 1000
        record = await engine.run(plan)
        steps = await engine.store.get_steps(record.id)
        (ledger,) = await engine.store.budget_ledger(record.id)
    return {
        "one": one,
        "budget": budget,
        "succeeded": [s for s in steps if s.status.value == "succeeded"],
        "refused": [s for s in steps if s.status.value == "failed"],
        "ledger": ledger,
        "sent": [r["body"]["max_tokens"] for r in fake.received()],
    }


async def test_parallel_steps_wait_for_reservations_in_flight_and_spend_within_the_budget(
    fake: FakeServer, tmp_path: Path
) -> None:
    """A budget for about 5.5 full reservations, 20 parallel steps, each call using 10% of
    its max_tokens: calls that do not fit wait for those in flight to settle instead of
    being refused, so (nearly) all succeed, and spend stays within the budget."""
    seen = await _fan_out(fake, tmp_path, 0.1, 5.5)
    ledger = seen["ledger"]
    assert len(seen["succeeded"]) >= 18, [s.error for s in seen["refused"]]
    assert ledger.spent_tokens <= seen["budget"] and ledger.reserved_tokens == 0
    assert set(seen["sent"]) == {1000}  # every call sent the max_tokens it reserved


async def test_with_usage_equal_to_the_reservation_no_step_that_fits_is_refused(
    fake: FakeServer, tmp_path: Path
) -> None:
    seen = await _fan_out(fake, tmp_path, 1.0, 5.5)
    ledger = seen["ledger"]
    assert ledger.spent_tokens <= seen["budget"] and ledger.reserved_tokens == 0
    assert all("budget" in (s.error or "") for s in seen["refused"])
    # what is left would not pay for one more call: no refused step would have fit
    assert seen["budget"] - ledger.spent_tokens < seen["one"]
    assert len(seen["succeeded"]) == 5


async def test_usage_above_the_reservation_is_booked_and_said(fake: FakeServer, tmp_path: Path) -> None:
    fake.program({"usage": {"prompt_tokens": 13, "completion_tokens": 5000}}, {})
    events: list[Any] = []
    async with Engine(str(tmp_path / "b.db"), llm=engine_config(fake)) as engine:
        engine.subscribe(lambda e: events.append(e) if e.kind == "budget.overrun" else None)
        plan = parallel_plan(2, {"tokens": 6000})
        plan["policy"]["max_parallel"] = 1
        plan["steps"][1]["needs"] = ["q0"]
        for step in plan["steps"]:
            step["with"]["max_tokens"] = 1000
        record = await engine.run(plan)
        steps = {s.step_id: s for s in await engine.store.get_steps(record.id)}
        (ledger,) = await engine.store.budget_ledger(record.id)
    assert ledger.spent_tokens == 5013  # booked as used
    assert [e.data["used_tokens"] for e in events] == [5013]
    # what is left (987) cannot pay for the next call's reservation: refused, not sent
    assert steps["q1"].status.value == "failed" and "budget" in (steps["q1"].error or "")
    assert len(fake.received()) == 1


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


async def test_cheaper_walks_the_configured_tiers_not_only_fallbacks(
    fake: FakeServer, tmp_path: Path
) -> None:
    """premium (gpt-4o) has no fallbacks; the cheap tier below it does fit the budget."""
    config = {
        "tiers": {"cheap": ["mini"], "premium": ["solo"]},
        "models": {"solo": {"provider": "openai", "base_url": f"{fake.url}/v1", "model": "gpt-4o"}},
    }
    llm = engine_config(fake).model_dump()
    llm["models"].update(config["models"])
    llm["tiers"] = config["tiers"]
    fake.program({"text": "cheap answer"})
    step = {
        "id": "ask",
        "task": "llm.generate",
        "with": {"prompt": "Explain baton.", "tier": "premium"},
        "budget": {"usd": 0.005, "on_exhausted": "cheaper"},
    }
    async with Engine(str(tmp_path / "b.db"), llm=LLMConfig.model_validate(llm)) as engine:
        record = await engine.run({"name": "tiers", "steps": [step]})
        (done,) = await engine.store.get_steps(record.id)
    assert record.status is RunStatus.COMPLETED, done.error
    assert done.output["model"] == "gpt-4o-mini"
    assert [r["body"]["model"] for r in fake.received()] == ["gpt-4o-mini"]
