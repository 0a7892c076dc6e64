"""The cost forecast (`baton validate`) and the refusal of a plan that cannot finish
within its budget (`baton run`, exit 2, nothing written)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from baton import Engine, RunStatus
from baton.llm import tokens
from baton.llm.types import Message
from tests.llm.conftest import FakeServer

PROMPT = "Summarise the design of a durable workflow engine in three paragraphs."


def llm_file(tmp_path: Path, url: str = "http://127.0.0.1:9") -> Path:
    config = {
        "default_model": "mini",
        "models": {
            "mini": {"provider": "openai", "base_url": f"{url}/v1", "model": "gpt-4o-mini"},
            "big": {"provider": "openai", "base_url": f"{url}/v1", "model": "gpt-4o"},
        },
    }
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan_file(tmp_path: Path, budget: dict[str, Any] | None = None) -> Path:
    plan: dict[str, Any] = {
        "name": "cost",
        "steps": [
            {"id": "a", "task": "llm.generate", "with": {"prompt": PROMPT, "max_tokens": 500}},
            {
                "id": "b",
                "task": "llm.generate",
                "needs": ["a"],
                "with": {"prompt": "Critique: ${{ steps.a.output.text }}", "model": "big"},
                "validate": [{"kind": "not_empty"}],
            },
            {"id": "c", "task": "echo", "with": {"x": 1}},
        ],
    }
    if budget is not None:
        plan["budget"] = budget
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def baton(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=60)


def test_validate_forecasts_each_model_step_and_the_plan(tmp_path: Path) -> None:
    done = baton(
        "validate",
        str(plan_file(tmp_path)),
        "--llm",
        str(llm_file(tmp_path)),
        "--db",
        str(tmp_path / "no.db"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    cost = json.loads(done.stdout)["cost"]
    assert set(cost["steps"]) == {"a", "b"} and cost["cache_hit_rate"] is None
    a, b, total = cost["steps"]["a"], cost["steps"]["b"], cost["total"]
    prompt = tokens.estimate_messages([Message("user", PROMPT)], "gpt-4o-mini")
    # a: one attempt; at most its prompt and max_tokens, at least its prompt and one token
    assert a["tokens"] == {"min": prompt + 1, "expected": prompt + 250, "max": prompt + 500}
    assert a["model"] == "mini" and b["model"] == "big"
    # gpt-4o-mini: $0.15 / $0.60 per million tokens in / out
    assert a["usd"]["max"] == round((prompt * 0.15 + 500 * 0.60) / 1e6, 8)
    # b: validators, so 4 attempts; the context of the step it needs (1,500 tokens); 1,024 out
    critique = tokens.estimate_messages([Message("user", "Critique: ")], "gpt-4o")
    assert b["tokens"]["max"] == 4 * (critique + 1500 + 1024)
    for part in ("min", "expected", "max"):
        assert total["tokens"][part] == a["tokens"][part] + b["tokens"][part]
        assert a["usd"][part] <= a["usd"]["max"] and b["usd"]["min"] <= b["usd"][part]
    text = baton(
        "validate",
        str(plan_file(tmp_path)),
        "--llm",
        str(llm_file(tmp_path)),
        "--db",
        str(tmp_path / "no.db"),
    )
    assert "cost of its 2 model step(s), min / expected / max (no history)" in text.stdout
    assert not (tmp_path / "no.db").exists()  # a database that is not there is not made


def test_a_plan_that_cannot_finish_within_its_budget_is_refused_before_it_runs(tmp_path: Path) -> None:
    plan, llm, db = plan_file(tmp_path, {"usd": 0.00001}), llm_file(tmp_path), tmp_path / "b.db"
    checked = baton("validate", str(plan), "--llm", str(llm), "--db", str(db), "--json")
    assert checked.returncode == 2 and json.loads(checked.stdout)["valid"] is False
    problem = json.loads(checked.stdout)["cost"]["over_budget"][0]
    assert problem["where"] == "budget" and "cost at least $" in problem["message"]
    ran = baton("run", str(plan), "--llm", str(llm), "--db", str(db))
    assert ran.returncode == 2 and "its model calls cost at least" in ran.stderr
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    # a token budget too; and one that lets cached answers stand in is not refused
    assert (
        baton("validate", str(plan_file(tmp_path, {"tokens": 10})), "--llm", str(llm), "--json").returncode
        == 2
    )
    cached = plan_file(tmp_path, {"tokens": 10, "on_exhausted": "cache"})
    assert baton("validate", str(cached), "--llm", str(llm), "--json").returncode == 0


async def test_the_forecast_expects_what_the_caches_answered_before(fake: FakeServer, tmp_path: Path) -> None:
    llm = llm_file(tmp_path, fake.url)
    step = {"id": "a", "task": "llm.generate", "with": {"prompt": PROMPT, "max_tokens": 500}}
    fake.program({"text": "an answer"})
    async with Engine(str(tmp_path / "b.db"), llm=llm) as engine:
        for _ in range(2):  # the second from the cache
            assert (await engine.run({"name": "p", "steps": [step]})).status is RunStatus.COMPLETED
        _, cold, _ = await Engine(str(tmp_path / "other.db"), llm=llm).forecast(
            {"name": "p", "steps": [step]}
        )
        _, warm, hit_rate = await engine.forecast({"name": "p", "steps": [step]})
    assert hit_rate == 0.5
    assert warm.tokens_expected == round(0.5 * cold.tokens_expected)
    assert warm.tokens_min == cold.tokens_min and warm.tokens_max == cold.tokens_max


def test_the_forecast_prices_each_step_on_the_model_its_estimate_routes_to(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/v1"
    config = {
        "models": {
            "mini": {"provider": "openai", "base_url": url, "model": "gpt-4o-mini"},
            "big": {"provider": "openai", "base_url": url, "model": "gpt-4o"},
        },
        "tiers": {"cheap": ["mini"], "premium": ["big"]},
        "routing": {"simple": "cheap", "medium": "cheap", "complex": "premium", "crisis": "premium"},
    }
    (tmp_path / "llm.yaml").write_text(yaml.safe_dump(config))
    plan = {
        "name": "routed",
        "steps": [
            {"id": "tag", "task": "llm.generate", "with": {"prompt": "Tag this in one word: a refund"}},
            {"id": "plan", "task": "llm.generate", "with": {"prompt": "Design a migration plan in depth."}},
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = baton("validate", str(tmp_path / "plan.json"), "--llm", str(tmp_path / "llm.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["cost"]["steps"]
    assert (steps["tag"]["model"], steps["plan"]["model"]) == ("mini", "big")
