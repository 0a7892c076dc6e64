"""The cost ladder's first rung: rules answer before the cache and the models, for free."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton import Engine, RunStatus
from baton.errors import PlanError
from baton.llm import LLMConfig
from tests.llm.conftest import FakeServer


def rules_config(fake: FakeServer, rules: list[dict[str, str]]) -> LLMConfig:
    return LLMConfig.model_validate(
        {
            "default_model": "local",
            "models": {"local": {"provider": "openai", "base_url": f"{fake.url}/v1"}},
            "rules": rules,
        }
    )


def shout(prompt: str, match: object) -> str | None:
    """A handler: answers 'shout X' in capitals, passes on anything with 'quietly'."""
    return None if "quietly" in prompt else prompt.upper()


RULES = [
    {"name": "order", "prompt": r"status of order (?P<id>\d+)", "answer": r"Order \g<id> ships today."},
    {"name": "shout", "prompt": "^shout", "handler": "tests.llm.test_rules:shout"},
]


def step(step_id: str, prompt: str, **extra: object) -> dict[str, object]:
    return {"id": step_id, "task": "llm.generate", "with": {"prompt": prompt, **extra}}


async def test_a_matching_rule_answers_and_nothing_is_paid(fake: FakeServer, tmp_path: Path) -> None:
    fake.program({"text": "from the model"}, {"text": "from the model too"})
    plan = {
        "name": "ladder",
        "steps": [
            step("order", "What is the status of order 4411?"),
            step("shout", "shout hello"),
            step("quiet", "shout quietly"),  # the handler passes: the model answers
            step("other", "Summarize the week."),
        ],
    }
    async with Engine(str(tmp_path / "r.db"), llm=rules_config(fake, RULES)) as engine:
        record = await engine.run(plan)
        steps = {s.step_id: s.output for s in await engine.store.get_steps(record.id)}
    assert record.status is RunStatus.COMPLETED
    assert steps["order"]["text"] == "Order 4411 ships today."
    assert (steps["order"]["source"], steps["order"]["cost_usd"]) == ("autonomous", 0.0)
    assert steps["shout"]["text"] == "SHOUT HELLO" and steps["shout"]["model"] == "rule:shout"
    assert steps["quiet"]["source"] == "llm" and steps["other"]["source"] == "llm"
    asked = sorted(r["body"]["messages"][-1]["content"] for r in fake.received())
    assert asked == ["Summarize the week.", "shout quietly"]


async def test_a_rejected_rule_answer_is_retried_by_a_model(fake: FakeServer, tmp_path: Path) -> None:
    plan = {
        "name": "retry",
        "steps": [
            {
                **step("order", "status of order 7 as JSON", extract="json"),
                "retry": {"attempts": 2, "backoff_s": 0.01},
            },
            {**step("off", "status of order 8", rules=False), "needs": ["order"]},
        ],
    }
    fake.program({"text": '{"ok": true}'}, {"text": "eight"})  # the retry of order, then off
    async with Engine(str(tmp_path / "j.db"), llm=rules_config(fake, RULES)) as engine:
        record = await engine.run(plan)
        steps = {s.step_id: s.output for s in await engine.store.get_steps(record.id)}
        attempts = [a for a in await engine.store.get_attempts(record.id) if a.step_id == "order"]
    assert record.status is RunStatus.COMPLETED
    assert [a.status for a in attempts] == ["failed", "succeeded"]  # the rule's text is not JSON
    assert steps["order"]["source"] == "llm" and steps["order"]["value"] == {"ok": True}
    assert (steps["off"]["source"], steps["off"]["text"]) == ("llm", "eight")  # rules: false


async def test_a_bad_rule_is_refused_before_the_run(fake: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="regular expression"):
        rules_config(fake, [{"name": "x", "prompt": "(", "answer": "y"}])
    with pytest.raises(ValueError, match="exactly one of answer and handler"):
        rules_config(fake, [{"name": "x", "prompt": "a"}])
    config = rules_config(fake, [{"name": "x", "prompt": "a", "handler": "no_such_module:f"}])
    async with Engine(str(tmp_path / "b.db"), llm=config) as engine:
        with pytest.raises(PlanError, match="rule 'x': cannot import 'no_such_module'"):
            await engine.submit({"name": "bad", "steps": [step("s", "a question")]})
        assert await engine.store.list_runs() == []
