"""llm.generate through the engine: the generation retry loop as a user sees it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton import Engine, RunStatus
from baton.errors import PlanError
from baton.llm import LLMConfig
from tests.llm.conftest import FakeServer

CODE_STEP: dict[str, Any] = {
    "id": "code",
    "task": "llm.generate",
    "with": {"prompt": "Write f() returning 1.", "extract": "code", "language": "python"},
    "retry": {"attempts": 3, "backoff_s": 0.01},
    "validate": [{"kind": "python_syntax", "field": "text"}],
}


def http_config(fake: FakeServer) -> LLMConfig:
    return LLMConfig.model_validate(
        {"default_model": "local", "models": {"local": {"provider": "openai", "base_url": f"{fake.url}/v1"}}}
    )


async def test_each_attempt_gets_its_temperature_and_the_reason_the_last_was_rejected(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.program(
        {"text": "Here:\n```python\ndef f(:\n    return 1\n```"},
        {"text": "Fixed:\n```python\ndef f():\n    return 1\n```\nDone."},
    )
    async with Engine(str(tmp_path / "b.db"), llm=http_config(fake)) as engine:
        record = await engine.run({"name": "gen", "steps": [CODE_STEP]})
        (step,) = await engine.store.get_steps(record.id)
        attempts = await engine.store.get_attempts(record.id)
    assert record.status is RunStatus.COMPLETED
    assert step.output["text"] == "def f():\n    return 1\n"
    first, second = (r["body"] for r in fake.received())
    assert (first["temperature"], second["temperature"]) == (0.7, 0.5)
    assert first["messages"] == [{"role": "user", "content": "Write f() returning 1."}]
    fed_back = second["messages"][0]["content"]
    assert fed_back.startswith("Write f() returning 1.\n\nYour previous answer was rejected:\n")
    assert "validation failed: python_syntax: line 1" in fed_back
    assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    assert attempts[0].detail is not None and attempts[0].detail["answer"].startswith("Here:")
    assert attempts[1].detail is not None
    assert attempts[1].detail["usage"] == {"input_tokens": 13, "output_tokens": 5}
    assert attempts[1].detail["temperature"] == 0.5


def write_cassette(path: Path) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "responses": [
                    {"step": "code", "attempt": 1, "text": "```python\ndef f(:\n```"},
                    {"step": "code", "text": "```python\ndef f():\n    return 1\n```"},
                    {
                        "prompt": "(?i)summari[sz]e",
                        "text": "f returns one.",
                        "usage": {"input_tokens": 9, "output_tokens": 3},
                    },
                ]
            }
        )
    )


SUMMARY_STEP = {
    "id": "summary",
    "task": "llm.generate",
    "needs": ["code"],
    "with": {"prompt": "Summarize: ${{ steps.code.output.text }}"},
}


async def test_a_cassette_makes_a_plan_deterministic(tmp_path: Path) -> None:
    write_cassette(tmp_path / "cassette.yaml")
    config = tmp_path / "llm.yaml"
    config.write_text(
        "default_model: replay\nmodels:\n  replay: {provider: scripted, cassette: cassette.yaml}\n"
    )
    outputs = []
    for n in range(2):
        async with Engine(str(tmp_path / f"run{n}.db"), llm=config) as engine:
            record = await engine.run({"name": "replay", "steps": [CODE_STEP, SUMMARY_STEP]})
            assert record.status is RunStatus.COMPLETED
            outputs.append(
                {s.step_id: (s.output, s.attempt) for s in await engine.store.get_steps(record.id)}
            )
    assert outputs[0] == outputs[1]
    assert outputs[0]["code"] == (
        {
            "text": "def f():\n    return 1\n",
            "model": "replay",
            "usage": outputs[0]["code"][0]["usage"],
            "cost_usd": None,  # "replay" is in no price table
            "source": "llm",
        },
        2,
    )
    assert outputs[0]["summary"][0]["usage"] == {"input_tokens": 9, "output_tokens": 3}


async def test_record_mode_saves_answers_that_replay_without_the_network(
    fake: FakeServer, tmp_path: Path
) -> None:
    config = tmp_path / "llm.yaml"
    config.write_text(
        "default_model: rec\n"
        "models:\n"
        f"  live: {{provider: openai, base_url: '{fake.url}/v1'}}\n"
        "  rec: {provider: scripted, cassette: recorded.yaml, record_from: live}\n"
    )
    fake.program({"text": "```python\ndef f():\n    return 1\n```"}, {"text": "It returns 1."})
    async with Engine(str(tmp_path / "a.db"), llm=config) as engine:
        live = await engine.run({"name": "rec", "steps": [CODE_STEP, SUMMARY_STEP]})
        live_out = {s.step_id: s.output["text"] for s in await engine.store.get_steps(live.id)}
    assert len(fake.received()) == 2
    recorded = yaml.safe_load((tmp_path / "recorded.yaml").read_text())["responses"]
    assert [(r["step"], r["attempt"]) for r in recorded] == [("code", 1), ("summary", 1)]

    config.write_text("default_model: rec\nmodels:\n  rec: {provider: scripted, cassette: recorded.yaml}\n")
    fake.program()
    async with Engine(str(tmp_path / "b.db"), llm=config) as engine:
        replay = await engine.run({"name": "rec", "steps": [CODE_STEP, SUMMARY_STEP]})
        replay_out = {s.step_id: s.output["text"] for s in await engine.store.get_steps(replay.id)}
    assert replay_out == live_out
    assert fake.received() == []


async def test_a_missing_key_rejects_the_plan_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = LLMConfig.model_validate({"default_model": "gpt", "models": {"gpt": {"provider": "openai"}}})
    async with Engine(str(tmp_path / "b.db"), llm=config) as engine:
        with pytest.raises(PlanError) as info:
            await engine.submit({"name": "x", "steps": [CODE_STEP]})
        assert await engine.store.list_runs() == []
    assert "model 'gpt' needs its API key in $OPENAI_API_KEY, which is not set" in str(info.value)


def test_the_cli_names_llm_config_problems_and_exits_2(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"name": "x", "steps": [CODE_STEP]}))
    no_config = subprocess.run(
        [sys.executable, "-m", "baton", "run", str(plan), "--db", str(tmp_path / "b.db")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert no_config.returncode == 2
    assert (
        "no model named and no default_model configured (give an LLM config: --llm FILE)" in no_config.stderr
    )
    assert not (tmp_path / "b.db").exists()
    bad = tmp_path / "llm.yaml"
    bad.write_text("models: [1, 2]\n")
    broken = subprocess.run(
        [sys.executable, "-m", "baton", "validate", str(plan), "--llm", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert broken.returncode == 2
    assert f"error: LLM config {bad}: models: Input should be a valid dictionary" in broken.stderr
    assert "Traceback" not in broken.stderr + no_config.stderr


async def test_the_same_question_is_answered_from_the_cache_in_a_later_run(
    fake: FakeServer, tmp_path: Path
) -> None:
    config = LLMConfig.model_validate(
        {
            "default_model": "local",
            "models": {"local": {"provider": "openai", "base_url": f"{fake.url}/v1", "model": "gpt-4o-mini"}},
        }
    )
    step = {"id": "ask", "task": "llm.generate", "with": {"prompt": "What is baton?"}}
    fake.program({"text": "An orchestration engine."})
    outputs = []
    for _ in range(2):
        async with Engine(str(tmp_path / "shared.db"), llm=config) as engine:
            record = await engine.run({"name": "cached", "steps": [step]})
            (done,) = await engine.store.get_steps(record.id)
            (attempt,) = await engine.store.get_attempts(record.id)
            outputs.append((done.output, attempt.detail))
    assert len(fake.received()) == 1, "the second run did not call the model"
    (first, _), (second, second_detail) = outputs
    assert first["source"] == "llm" and first["cost_usd"] > 0
    assert second["text"] == first["text"] == "An orchestration engine."
    assert (second["source"], second["cost_usd"]) == ("cached", 0.0)
    assert second_detail is not None and second_detail["saved_usd"] == first["cost_usd"]

    uncached = {**step, "id": "fresh", "with": {"prompt": "What is baton?", "cache": False}}
    fake.program({"text": "Asked again."})
    async with Engine(str(tmp_path / "shared.db"), llm=config) as engine:
        record = await engine.run({"name": "uncached", "steps": [uncached]})
        (done,) = await engine.store.get_steps(record.id)
    assert done.output["text"] == "Asked again." and len(fake.received()) == 1


async def test_a_rejected_answer_is_never_served_from_the_cache(fake: FakeServer, tmp_path: Path) -> None:
    """A validator or the extraction rejects the answer: it is not cached, so a re-run (or
    a retry asking the same) calls the model again instead of replaying the rejection."""
    config = http_config(fake)
    checked = {
        "id": "ask",
        "task": "llm.generate",
        "with": {"prompt": "Say a number."},
        "validate": [{"kind": "regex", "field": "text", "pattern": "^[0-9]+$"}],
        "retry": {"attempts": 1},
    }
    as_json = {"id": "js", "task": "llm.generate", "with": {"prompt": "Give JSON.", "extract": "json"}}
    serial = {"max_parallel": 1}
    fake.program({"text": "seven"}, {"text": "{not json"})
    async with Engine(str(tmp_path / "shared.db"), llm=config) as engine:
        # one step at a time: the fake server answers in the order it is asked
        failed = await engine.run({"name": "first", "steps": [checked, as_json], "policy": serial})
    assert failed.status is RunStatus.FAILED and len(fake.received()) == 2
    fake.program({"text": "7"}, {"text": '{"ok": true}'})
    async with Engine(str(tmp_path / "shared.db"), llm=config) as engine:
        again = await engine.run({"name": "again", "steps": [checked, as_json], "policy": serial})
        steps = {s.step_id: s for s in await engine.store.get_steps(again.id)}
    assert again.status is RunStatus.COMPLETED, [s.error for s in steps.values()]
    assert len(fake.received()) == 2, "both asked the model again"
    assert steps["ask"].output["text"] == "7" and steps["js"].output["value"] == {"ok": True}
    # the accepted answers are cached: a third run asks nothing
    fake.program()
    async with Engine(str(tmp_path / "shared.db"), llm=config) as engine:
        third = await engine.run({"name": "third", "steps": [checked, as_json]})
        sources = {s.step_id: s.output["source"] for s in await engine.store.get_steps(third.id)}
    assert third.status is RunStatus.COMPLETED and fake.received() == []
    assert sources == {"ask": "cached", "js": "cached"}


async def test_cache_entries_from_before_acceptance_are_ignored(fake: FakeServer, tmp_path: Path) -> None:
    config = http_config(fake)
    step = {"id": "ask", "task": "llm.generate", "with": {"prompt": "What is baton?"}}
    fake.program({"text": "fresh"})
    async with Engine(str(tmp_path / "b.db"), llm=config) as engine:
        # an entry as an earlier version wrote it (no "v"), under the key this step asks by
        from baton.llm.gateway import cache_key
        from baton.llm.types import ChatRequest, Message

        request = ChatRequest(messages=(Message("user", "What is baton?"),), temperature=0.7)
        old = json.dumps({"text": "stale, maybe rejected", "model": "local", "provider": "openai"})
        await engine.store.cache_put(cache_key("local", request), old, 0.0, None)
        record = await engine.run({"name": "p", "steps": [step]})
        (done,) = await engine.store.get_steps(record.id)
    assert done.output["text"] == "fresh" and len(fake.received()) == 1


async def test_a_checked_step_reads_the_answer_and_gets_the_schedules_attempts(
    fake: FakeServer, tmp_path: Path
) -> None:
    """No ``field``: the validator reads the answer's text; no retry policy: with
    validators, an attempt per temperature of the schedule (4), each fed the last reason."""
    step = {
        "id": "code",
        "task": "llm.generate",
        "with": {"prompt": "Write f().", "extract": "code", "language": "python"},
        "validate": [{"kind": "python_syntax"}],
    }
    broken = {"text": "```python\ndef f(:\n```"}
    fake.program(broken, broken, broken, {"text": "```python\ndef f():\n    return 1\n```"})
    async with Engine(str(tmp_path / "b.db"), llm=http_config(fake)) as engine:
        record = await engine.run({"name": "p", "steps": [step]})
        attempts = await engine.store.get_attempts(record.id)
    assert record.status is RunStatus.COMPLETED
    assert [a.status for a in attempts] == ["failed", "failed", "failed", "succeeded"]
    assert "python_syntax: line 1" in (attempts[0].error or "")
    temperatures = [r["body"]["temperature"] for r in fake.received()]
    assert temperatures == [0.7, 0.5, 0.3, 0.3]
    # a retry policy of its own still rules
    fake.program(broken)
    async with Engine(str(tmp_path / "c.db"), llm=http_config(fake)) as engine:
        once = await engine.run({"name": "p", "steps": [{**step, "retry": {"attempts": 1}}]})
    assert once.status is RunStatus.FAILED and len(fake.received()) == 1


DDL = "CREATE TABLE invoices (customer text, total int)"


async def test_the_outputs_of_its_needs_reach_the_model_most_relevant_first(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.program({"text": "SELECT customer, sum(total) FROM invoices GROUP BY customer"}, {"text": "ok"})
    plan = {
        "name": "context",
        "steps": [
            {"id": "logs", "task": "echo", "with": {"line": "GET /health 200"}},
            {"id": "schema", "task": "echo", "with": {"ddl": DDL}},
            {"id": "owner", "task": "echo", "with": {"name": "ops team"}},
            {"id": "extra", "task": "echo", "with": {"note": "the invoices table is append-only"}},
            {
                "id": "query",
                "task": "llm.generate",
                "needs": ["logs", "schema", "owner", "extra"],
                "with": {"prompt": "Sum the invoices total per customer.", "system": "Answer in SQL."},
            },
            {
                "id": "plain",
                "task": "llm.generate",
                "needs": ["schema"],
                "with": {"prompt": "Say ok.", "context": False},
            },
        ],
    }
    async with Engine(str(tmp_path / "c.db"), llm=http_config(fake)) as engine:
        record = await engine.run(plan)
        attempts = {a.step_id: a for a in await engine.store.get_attempts(record.id)}
    assert record.status is RunStatus.COMPLETED
    bodies = {r["body"]["messages"][-1]["content"]: r["body"]["messages"] for r in fake.received()}
    query = bodies["Sum the invoices total per customer."]
    system = query[0]["content"]
    assert query[0]["role"] == "system" and system.startswith("Answer in SQL.\n\n")
    # three of the four needs, those sharing the prompt's words first; the prompt unchanged
    assert system.index("## schema") < system.index("## extra")
    assert system.count("## ") == 3 and "CREATE TABLE invoices" in system
    assert query[1] == {"role": "user", "content": "Sum the invoices total per customer."}
    assert attempts["query"].detail is not None
    assert attempts["query"].detail["context"][:2] == ["schema", "extra"]
    assert bodies["Say ok."] == [{"role": "user", "content": "Say ok."}]  # context: false
