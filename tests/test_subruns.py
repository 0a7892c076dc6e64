"""Sub-runs: a step (task: plan) that runs a plan as a child run. Its output is the child's
result; the child is found again after a crash, never started twice; pause, resume and
cancel reach it; it is held to what is left of the parent's budget and its spend is the
parent's."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton import Engine, RunStatus
from baton.errors import PolicyDenied
from baton.llm import LLMConfig
from tests.conftest import StoreFactory

GATE = "touch gate.started; while [ ! -e gate.open ]; do sleep 0.02; done; echo opened"
CHILD: dict[str, Any] = {
    "name": "child",
    "steps": [
        {"id": "a", "task": "echo", "with": {"x": 1}},
        {"id": "gate", "task": "shell", "needs": ["a"], "with": {"argv": ["sh", "-c", GATE]}},
        {
            "id": "b",
            "task": "echo",
            "needs": ["gate"],
            "with": {"x": "${{ steps.a.output.x }}", "gate": "${{ steps.gate.output.stdout }}"},
        },
    ],
}
PARENT: dict[str, Any] = {"name": "parent", "steps": [{"id": "sub", "task": "plan", "with": {"plan": CHILD}}]}


async def _until(check: Any, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_sub_run_runs_its_plan_with_its_own_references_and_gives_its_result(
    stores: StoreFactory, tmp_path: Path
) -> None:
    (tmp_path / "gate.open").touch()
    async with Engine(stores(), workdir=tmp_path, poll_s=0.05) as engine:
        record = await engine.run(PARENT)
        (step,) = await engine.store.get_steps(record.id)
        children = await engine.store.child_runs(record.id)
    assert record.status is RunStatus.COMPLETED
    assert step.output["result"] == {"x": 1, "gate": "opened\n"}
    assert step.output["outputs"]["a"] == {"x": 1}
    assert children == [(step.output["run_id"], "sub", RunStatus.COMPLETED)]


async def test_a_plan_made_by_an_earlier_step_runs_and_a_failing_child_fails_the_step(tmp_path: Path) -> None:
    failing = {"name": "bad", "steps": [{"id": "boom", "task": "fail", "with": {"message": "no luck"}}]}
    plan = {
        "name": "made",
        "steps": [
            {"id": "make", "task": "echo", "with": {"doc": failing}},
            {
                "id": "sub",
                "task": "plan",
                "needs": ["make"],
                "with": {"plan": "${{ steps.make.output.doc }}"},
            },
        ],
    }
    async with Engine(str(tmp_path / "f.db"), workdir=tmp_path, poll_s=0.05) as engine:
        record = await engine.run(plan)
        steps = {s.step_id: s for s in await engine.store.get_steps(record.id)}
        children = await engine.store.child_runs(record.id)
    assert record.status is RunStatus.FAILED
    assert "plan: child run" in (steps["sub"].error or "") and "failed" in (steps["sub"].error or "")
    assert len(children) == 1 and children[0][2] is RunStatus.FAILED  # retried: the same child


async def test_pause_resume_and_cancel_reach_the_child(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "p.db"), workdir=tmp_path, poll_s=0.05) as engine:
        handle = await engine.submit(PARENT)
        await _until(lambda: asyncio.sleep(0, (tmp_path / "gate.started").exists()))
        ((child, _, _),) = await engine.store.child_runs(handle.run_id)
        await engine.pause(handle.run_id)
        assert (await engine.store.get_run(child)).status is RunStatus.PAUSED
        (tmp_path / "gate.open").touch()  # the running step finishes; the next does not start
        await _until(lambda: _status(engine, child, "gate", "succeeded"))
        await asyncio.sleep(0.3)
        assert [s.status for s in await engine.store.get_steps(child)][2] == "ready"  # not started
        await engine.resume(handle.run_id)
        record = await handle.wait(timeout_s=15)
        assert record.status is RunStatus.COMPLETED
        assert (await engine.store.get_run(child)).status is RunStatus.COMPLETED
        # and a cancelled parent cancels its child
        (tmp_path / "gate.open").unlink()
        (tmp_path / "gate.started").unlink()
        again = await engine.submit({**PARENT, "name": "again"})
        await _until(lambda: asyncio.sleep(0, (tmp_path / "gate.started").exists()))
        ((other, _, _),) = await engine.store.child_runs(again.run_id)
        await engine.cancel(again.run_id)
        await _until(lambda: _run_is(engine, other, RunStatus.CANCELLED))


async def _status(engine: Engine, run_id: str, step_id: str, status: str) -> bool:
    return any(s.step_id == step_id and s.status == status for s in await engine.store.get_steps(run_id))


async def _run_is(engine: Engine, run_id: str, status: RunStatus) -> bool:
    return (await engine.store.get_run(run_id)).status is status


def test_a_parent_killed_while_its_child_runs_resumes_without_a_second_child(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(PARENT))
    db = tmp_path / "k.db"
    argv = [sys.executable, "-m", "baton", "run", "parent.yaml", "--db", str(db)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().split()[1]
    deadline = time.monotonic() + 30
    while not (tmp_path / "gate.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    with sqlite3.connect(db) as con:
        (child,) = [
            r[0] for r in con.execute("SELECT child_run_id FROM subruns WHERE parent_run_id = ?", (run_id,))
        ]
        a_done = con.execute(
            "SELECT finished_at FROM steps WHERE run_id = ? AND step_id = 'a'", (child,)
        ).fetchone()[0]
    (tmp_path / "gate.open").touch()
    resumed = subprocess.run(
        [sys.executable, "-m", "baton", "resume", run_id, "--db", str(db), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["status"] == "completed" and doc["steps"][0]["output"]["run_id"] == child
    with sqlite3.connect(db) as con:
        children = con.execute(
            "SELECT child_run_id FROM subruns WHERE parent_run_id = ?", (run_id,)
        ).fetchall()
        after = con.execute(
            "SELECT finished_at, attempt FROM steps WHERE run_id = ? AND step_id = 'a'", (child,)
        ).fetchone()
        status = con.execute("SELECT status FROM runs WHERE id = ?", (child,)).fetchone()[0]
    assert children == [(child,)] and status == "completed"
    assert after == (a_done, 1)  # the child's committed step was not run again


def llm(tmp_path: Path, usage: dict[str, int]) -> LLMConfig:
    cassette = tmp_path / "c.yaml"
    cassette.write_text(yaml.safe_dump({"responses": [{"prompt": ".", "text": "ok", "usage": usage}]}))
    model = {"provider": "scripted", "model": "gpt-4o-mini", "cassette": str(cassette)}
    return LLMConfig.model_validate({"default_model": "m", "models": {"m": model}, "cache": {"exact": False}})


async def test_the_child_is_held_to_what_is_left_of_the_parents_budget_and_its_spend_is_the_parents(
    tmp_path: Path,
) -> None:
    child = {
        "name": "kid",
        "steps": [
            {"id": f"ask{i}", "task": "llm.generate", "with": {"prompt": f"hi {i}", "max_tokens": 100}}
            for i in range(3)
        ],
    }
    parent = {
        "name": "budgeted",
        "budget": {"tokens": 100_000},
        "steps": [{"id": "sub", "task": "plan", "with": {"plan": child}}],
    }
    async with Engine(
        str(tmp_path / "b.db"), workdir=tmp_path, llm=llm(tmp_path, {"input_tokens": 10, "output_tokens": 20})
    ) as engine:
        record = await engine.run(parent)
        (step,) = await engine.store.get_steps(record.id)
        ledger = {e.scope: e for e in await engine.store.budget_ledger(record.id)}
        kid = await engine.store.get_run(step.output["run_id"])
    assert record.status is RunStatus.COMPLETED
    assert (kid.plan or {})["budget"]["tokens"] == 100_000  # what was left when it started
    assert ledger["run"].spent_tokens == 3 * 30  # the child's spend, booked to the parent
    tight = {**parent, "name": "tight", "budget": {"tokens": 50}}
    async with Engine(
        str(tmp_path / "b.db"), workdir=tmp_path, llm=llm(tmp_path, {"input_tokens": 10, "output_tokens": 20})
    ) as engine:
        refused = await engine.run(tight)
    assert refused.status is RunStatus.FAILED  # the child cannot spend past the parent's budget


async def test_an_operator_key_may_not_start_sub_runs(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "s.db"), workdir=tmp_path) as engine:
        with pytest.raises(PolicyDenied, match="needs plan"):
            await engine.submit(PARENT, key_role="operator", actor="key:test")
        assert await engine.store.list_runs() == []
