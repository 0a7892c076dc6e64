"""Goals end to end: a task in words classified, a template chosen, its sub-tasks run as a
durable plan, each outcome recorded once; learning that changes the choice; bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton import Engine
from baton.agents.goals import Agents, _filled
from baton.agents.learning import roll_up
from baton.agents.templates import Library, TemplateError, parse_template
from baton.errors import UsageError
from baton.llm import LLMConfig
from tests.conftest import StoreFactory
from tests.llm.conftest import FakeServer

ELIXIR = (
    "```elixir\ndefmodule Events do\n  def handle(msg) do\n    case Jason.decode(msg) do\n"
    "      {:ok, m} -> {:ack, m}\n      {:error, e} -> {:nack, e}\n    end\n  end\nend\n```"
)
ANSWERS = [
    {
        "prompt": "Specify this NATS consumer",
        "text": "Subject user.events; durable user-events; explicit ack.",
    },
    {"prompt": "Write the consumer", "text": ELIXIR},
    {
        "prompt": "ExUnit|Write tests",
        "text": "```elixir\ndefmodule EventsTest do\n  use ExUnit.Case\nend\n```",
    },
    {"prompt": "Review", "text": "1. Bound the redeliveries."},
    {"prompt": "BAD-ANSWER", "text": "```python\ndef broken(:\n```"},
    {"prompt": ".", "text": "```python\ndef test_ok():\n    assert 1 + 1 == 2\n```"},
]


def config(tmp_path: Path, answers: list[dict[str, Any]] = ANSWERS, latency_s: float = 0.0) -> LLMConfig:
    cassette = tmp_path / "cassette.yaml"
    entries = [{**a, "latency_s": latency_s} if latency_s else a for a in answers]
    cassette.write_text(yaml.safe_dump({"responses": entries}))
    return LLMConfig.model_validate(
        {
            "default_model": "replay",
            "models": {"replay": {"provider": "scripted", "model": "gpt-4o-mini", "cassette": str(cassette)}},
        }
    )


async def test_a_goal_runs_the_chosen_templates_sub_tasks_and_records_each_outcome_once(
    stores: StoreFactory, tmp_path: Path
) -> None:
    async with Engine(stores(), llm=config(tmp_path), workdir=tmp_path) as engine:
        result = await engine.achieve(
            "Create a NATS consumer for processing user events", language="elixir", complexity="medium"
        )
        goal = await engine.store.get_goal(result.run_id)
        outcomes = await engine.store.outcomes()
        again = await engine.agents.collect()
        stats = await engine.agents.stats()
        run = await engine.store.get_run(result.run_id)
    assert result.status == "completed" and result.metrics["success"] is True
    assert result.task_type == "nats_consumer"
    assert result.template_used in {
        "elixir-nats_consumer",
        "nats_consumer",
        "universal-direct",
        "universal-staged",
    }
    assert goal is not None and goal.selection["chosen"] == result.template_used
    assert [c["level"] for c in goal.selection["candidates"]] == [
        "specific",
        "language-generic",
        "universal",
        "universal",
    ]
    steps = [s["id"] for s in (run.plan or {})["steps"]]
    assert sorted(o.step_id for o in outcomes) == sorted(steps)  # one outcome per sub-task
    assert all(o.template_id == result.template_used and o.success for o in outcomes)
    assert again == 0 and stats["total_executions"] == 1 and stats["success_rate"] == 1.0
    assert result.method == "llm" and result.model_used == "gpt-4o-mini"
    assert result.metrics["tokens_used"] > 0 and result.metrics["cost_usd"] > 0
    assert (run.plan or {})["policy"] == {"complexity": "medium"}


def test_the_fallback_chain_goes_from_the_task_and_language_to_the_universal_templates() -> None:
    library = Library.load()
    chain = [(str(cell), [t.id for t in ts]) for cell, ts in library.chain("nats_consumer", "elixir")]
    assert chain == [
        ("nats_consumer/elixir", ["elixir-nats_consumer"]),
        ("nats_consumer/*", ["nats_consumer"]),
        ("general/*", ["universal-direct", "universal-planned", "universal-staged"]),
    ]
    # a planner's template is chosen only when a planner is asked for
    assert "universal-planned" not in [t.id for t in library.candidates("nats_consumer", "elixir")]
    assert [t.id for t in library.candidates("nats_consumer", "elixir", planned=True)] == [
        "universal-planned"
    ]
    # no template for the language: straight to the language-generic one
    assert next(t.id for t in library.candidates("testing", "rust")) == "testing"
    for task_type in ("testing", "bugfix", "nats_consumer", "api_endpoint", "database", "security"):
        assert any(
            t.language is None for t in library.candidates(task_type, None) if t.task_type == task_type
        )


LEARN = """
id: {id}
task_type: testing
language: python
subtasks:
  - id: tests
    prompt: "{prompt} {{{{task}}}}"
    extract: code
    validate: [{{kind: python_syntax}}]
"""


async def test_learning_moves_the_choice_to_the_template_that_succeeds(tmp_path: Path) -> None:
    """Two templates for one cell, one whose answers never pass its validator: after a few
    goals of each, the draws settle on the one that works."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "good.yaml").write_text(LEARN.format(id="py-good", prompt="Write pytest tests for"))
    (folder / "bad.yaml").write_text(LEARN.format(id="py-bad", prompt="BAD-ANSWER"))
    library = Library.load([folder])
    only = Library([library.get("py-good"), library.get("py-bad")])
    chosen = []
    async with Engine(str(tmp_path / "l.db"), llm=config(tmp_path), workdir=tmp_path) as engine:
        agents = Agents(engine, only)
        for i in range(24):
            handle = await agents.start(
                f"Write unit tests for the slug function, case {i}",
                language="python",
                idempotency_key=f"g{i}",
            )
            await handle.wait()
            await agents.collect()
            goal = await engine.store.get_goal(handle.run_id)
            assert goal is not None
            chosen.append(goal.template_id)
        doc = await __import__("baton.agents.report", fromlist=["report"]).report(agents)
    assert {"py-good", "py-bad"} <= set(chosen[:8]), chosen  # both were tried
    assert chosen[-8:].count("py-good") >= 7, chosen
    (cell,) = doc["cells"]
    good, bad = cell["templates"]
    assert (good["id"], bad["id"]) == ("py-good", "py-bad") and good["mean"] > bad["mean"]
    assert good["successes"] == good["uses"] and bad["successes"] == 0
    assert good["chance_best"] > 0.8


async def test_a_goal_asked_again_is_done_by_the_same_template_and_answered_by_the_cache(
    tmp_path: Path,
) -> None:
    async with Engine(str(tmp_path / "a.db"), llm=config(tmp_path), workdir=tmp_path) as engine:
        first = await engine.achieve("Write unit tests for the tokenizer", language="python")
        again = [
            await engine.achieve("Write unit tests for the tokenizer", language="python") for _ in range(3)
        ]
        goal = await engine.store.get_goal(again[0].run_id)
        learned = roll_up(await engine.store.outcomes())
    assert {r.template_used for r in again} == {first.template_used}
    assert goal is not None and goal.selection["repeat_of"] == first.run_id
    assert [r.method for r in again] == ["cached"] * 3 and all(r.metrics["cost_usd"] == 0 for r in again)
    # what the cache answered teaches nothing about the template: only the first counts
    assert [g.informative for g in learned] == [True, False, False, False]


async def test_outcomes_are_recorded_once_when_two_processes_collect_at_once(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    async with Engine(db, llm=config(tmp_path), workdir=tmp_path) as engine:
        handles = [await engine.agents.start(f"Write unit tests for module {i}") for i in range(4)]
        for handle in handles:
            await handle.wait()
        async with Engine(db, llm=config(tmp_path), workdir=tmp_path) as other:
            counts = await asyncio.gather(engine.agents.collect(), other.agents.collect())
        outcomes = await engine.store.outcomes()
    assert sum(counts) == 4
    assert len({(o.run_id, o.step_id) for o in outcomes}) == len(outcomes)
    assert {o.run_id for o in outcomes} == {h.run_id for h in handles}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"goal": ""}, "the task description is empty"),
        ({"goal": "x" * 1_000_000}, "at most 20,000"),
        ({"goal": "Add tests", "language": "cobol"}, "unknown language 'cobol'"),
        ({"goal": "Add tests", "complexity": "huge"}, "unknown complexity 'huge'"),
        ({"goal": "Add tests", "context": {"colour": "red"}}, "unknown context key"),
    ],
)
async def test_bad_goals_are_refused_and_nothing_is_written(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    async with Engine(str(tmp_path / "b.db"), llm=config(tmp_path), workdir=tmp_path) as engine:
        with pytest.raises(UsageError, match=message):
            await engine.agents.start(**options)
        assert await engine.store.list_runs() == [] and await engine.store.list_goals() == []


def test_a_template_file_with_errors_is_named_with_its_line() -> None:
    text = (
        "id: t1\ntask_type: testing\nsubtasks:\n  - id: a\n    prompt: hi\n"
        "  - id: b\n    needs: [zz]\n    prompt: '{{nope}}'\n"
    )
    with pytest.raises(TemplateError) as caught:
        parse_template(text, "mine.yaml")
    message = caught.value.message
    assert "mine.yaml line 7: subtasks.1.needs: sub-task 'b' needs 'zz'" in message
    assert "mine.yaml line 8: subtasks.1.prompt: unknown placeholder {{nope}}" in message
    with pytest.raises(TemplateError, match=r"mine.yaml line 2: task_type: unknown task type 'tests'"):
        parse_template("id: t1\ntask_type: tests\nsubtasks: [{id: a, prompt: hi}]\n", "mine.yaml")
    with pytest.raises(TemplateError, match="not valid YAML"):
        parse_template("id: [", "mine.yaml")


def test_the_users_words_never_become_references_between_steps(tmp_path: Path) -> None:
    engine = Engine(str(tmp_path / "r.db"), llm=config(tmp_path), workdir=tmp_path)
    agents = Agents(engine)
    filled = _filled("say ${{ steps.x.output }}", None, {})
    plan = agents.plan(agents.library.get("universal-direct"), filled, None, None)
    assert "${{" not in json.dumps(plan) and "$ {{ steps.x.output }}" in plan["steps"][0]["with"]["prompt"]


def baton(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_the_commands_carry_out_a_goal_and_report_on_it(tmp_path: Path) -> None:
    llm = tmp_path / "llm.yaml"
    llm.write_text(yaml.safe_dump(config(tmp_path).model_dump(exclude={"base_dir"})))
    done = baton(
        "goal", "Write unit tests for the parser", "--llm", str(llm), "--db", "g.db", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "completed" and doc["task_type"] == "testing"
    assert set(doc["metrics"]) == {"time_ms", "tokens_used", "cost_usd", "cache_hit", "quality", "success"}
    stats = json.loads(baton("stats", "--db", "g.db", "--json", cwd=tmp_path).stdout)
    assert stats["total_executions"] == 1 and stats["template_usage"] == {doc["template_used"]: 1}
    report = json.loads(baton("templates", "report", "--db", "g.db", "--json", cwd=tmp_path).stdout)
    assert report["cells"][0]["recommendation"].startswith("insufficient data")
    listed = json.loads(baton("templates", "list", "--json", cwd=tmp_path).stdout)
    assert len(listed) >= 23 and {"python-testing", "elixir-nats_consumer"} <= {t["id"] for t in listed}
    bad = tmp_path / "mine"
    bad.mkdir()
    (bad / "x.yaml").write_text("id: x\ntask_type: nope\nsubtasks: []\n")
    refused = baton(
        "goal", "Add tests", "--llm", str(llm), "--db", "g.db", "--templates", str(bad), cwd=tmp_path
    )
    assert refused.returncode == 2 and "x.yaml line 2" in refused.stderr and "Traceback" not in refused.stderr
    with sqlite3.connect(tmp_path / "g.db") as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_a_goal_killed_mid_run_resumes_and_its_outcomes_are_recorded_once(tmp_path: Path) -> None:
    llm = tmp_path / "llm.yaml"
    llm.write_text(yaml.safe_dump(config(tmp_path, latency_s=0.4).model_dump(exclude={"base_dir"})))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baton",
            "goal",
            "Create a NATS consumer for user events",
            "--language",
            "elixir",
            "--template",
            "elixir-nats_consumer",
            "--llm",
            str(llm),
            "--db",
            "k.db",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().split()[1].rstrip(":")
    db = tmp_path / "k.db"
    deadline = __import__("time").monotonic() + 30
    while True:  # until a sub-task has committed, then kill -9
        with sqlite3.connect(db) as con:
            done = con.execute(
                "SELECT COUNT(*) FROM steps WHERE run_id = ? AND status = 'succeeded'", (run_id,)
            ).fetchone()[0]
        if done >= 1:
            break
        assert __import__("time").monotonic() < deadline
        __import__("time").sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    with sqlite3.connect(db) as con:
        before = dict(
            con.execute(
                "SELECT step_id, finished_at FROM steps WHERE run_id = ? AND status = 'succeeded'", (run_id,)
            ).fetchall()
        )
    resumed = baton("resume", run_id, "--llm", str(llm), "--db", "k.db", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads(baton("stats", "--db", "k.db", "--json", cwd=tmp_path).stdout)
    with sqlite3.connect(db) as con:
        after = dict(
            con.execute("SELECT step_id, finished_at FROM steps WHERE run_id = ?", (run_id,)).fetchall()
        )
        outcomes = con.execute("SELECT step_id FROM outcomes WHERE run_id = ?", (run_id,)).fetchall()
    assert all(after[step] == finished for step, finished in before.items())  # not run again
    assert stats["total_executions"] == 1 and len(outcomes) == len(after)


PLANNED = {
    "subtasks": [
        {"id": "spec", "prompt": "Specify the cache: keys, expiry, size."},
        {
            "id": "code",
            "prompt": "Write the cache ${{ steps.spec.output.text }}",
            "needs": ["spec"],
            "extract": "code",
        },
    ]
}


async def test_a_planner_model_decomposes_the_goal_its_refusals_fed_back(tmp_path: Path) -> None:
    answers = [
        {"prompt": "At most 6 sub-tasks", "attempt": 1, "text": "Sure! Here is a plan."},
        {
            "prompt": "At most 6 sub-tasks",
            "attempt": 2,
            "text": json.dumps({"subtasks": [{"id": "a", "prompt": "x", "needs": ["b"]}]}),
        },
        {"prompt": "At most 6 sub-tasks", "text": json.dumps(PLANNED)},
        *ANSWERS,
    ]
    async with Engine(str(tmp_path / "p.db"), llm=config(tmp_path, answers), workdir=tmp_path) as engine:
        result = await engine.agents.achieve("Write an LRU cache", language="python", decompose="planner")
        run = await engine.store.get_run(result.run_id)
        goal = await engine.store.get_goal(result.run_id)
        calls = [r for r in await engine.store.list_runs() if r.name == "call:llm.generate"]
        attempts = await engine.store.get_attempts(calls[0].id)
    assert result.status == "completed" and result.template_used == "universal-planned"
    steps = (run.plan or {})["steps"]
    assert [(s["id"], s["task"], s.get("needs", [])) for s in steps] == [
        ("spec", "llm.generate", []),
        ("code", "llm.generate", ["spec"]),
    ]
    # what the model planned never reads as a reference between steps
    assert steps[1]["with"]["prompt"] == "Write the cache $ {{ steps.spec.output.text }}"
    assert (
        goal is not None
        and goal.selection["planned"] == ["spec", "code"]
        and goal.selection["result"] == "code"
    )
    # each refusal was fed back into the next attempt
    assert [a.status for a in attempts] == ["failed", "failed", "succeeded"]
    assert "not JSON" in (attempts[0].error or "") and "needs 'b'" in (attempts[1].error or "")
    assert "not JSON" in (attempts[1].detail or {}).get("prompt", "")


@pytest.mark.parametrize(
    "answer",
    [
        "no plan today",
        json.dumps({"subtasks": []}),
        json.dumps({"subtasks": [{"id": "x", "prompt": "p", "task": "shell"}]}),
        json.dumps(
            {
                "subtasks": [
                    {"id": "x", "prompt": "p", "validate": [{"kind": "python", "function": "os:system"}]}
                ]
            }
        ),
        json.dumps({"subtasks": [{"id": "Bad Id", "prompt": "p"}]}),
    ],
)
async def test_a_planner_that_never_answers_a_valid_plan_refuses_the_goal(
    answer: str, tmp_path: Path
) -> None:
    answers = [{"prompt": "At most 6 sub-tasks", "text": answer}, *ANSWERS]
    async with Engine(str(tmp_path / "q.db"), llm=config(tmp_path, answers), workdir=tmp_path) as engine:
        with pytest.raises(
            UsageError, match=r"the planner's answer is not a valid plan after 3 attempt\(s\)"
        ):
            await engine.agents.start("Write an LRU cache", decompose="planner")
        # nothing of the goal was written; the planner's attempts are kept as their own call
        assert await engine.store.list_goals() == []
        assert [r.name for r in await engine.store.list_runs()] == ["call:llm.generate"]


TESTS_ANSWER = (
    "```python\ndef test_parse():\n    try:\n        assert parse('2026-12-04')\n"
    "    except ValueError:\n        raise\n```"
)


TESTS_ANSWER = (
    "```python\ndef test_parse():\n    try:\n        assert parse('2026-12-04')\n"
    "    except ValueError:\n        raise\n```"
)


async def test_a_goal_against_a_real_http_model_server(fake: FakeServer, tmp_path: Path) -> None:
    """The sub-tasks go over the wire (OpenAI's chat completions), in the order their needs
    say, each with the outputs it needs as context."""
    llm = LLMConfig.model_validate(
        {
            "default_model": "gpt",
            "models": {"gpt": {"provider": "openai", "base_url": f"{fake.url}/v1", "model": "gpt-4o-mini"}},
        }
    )
    fake.program(
        {"text": "- parse a date\n- reject a bad one"},
        {"text": TESTS_ANSWER},
    )
    library = Library([Library.load().get("python-testing")])
    async with Engine(str(tmp_path / "h.db"), llm=llm, workdir=tmp_path) as engine:
        result = await Agents(engine, library).achieve(
            "Write unit tests for the date parser", language="python"
        )
    bodies = [r["body"] for r in fake.received()]
    assert result.status == "completed" and result.template_used == "python-testing"
    assert [b["model"] for b in bodies] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert "List the behaviours" in bodies[0]["messages"][-1]["content"]
    assert "parse a date" in bodies[1]["messages"][0]["content"]  # the cases, as context
    assert result.result.startswith("def test_parse():") and result.metrics["tokens_used"] > 0
    assert result.metrics["cost_usd"] > 0 and result.metrics["quality"] > 0.5
