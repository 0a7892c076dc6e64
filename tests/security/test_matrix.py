"""The role by capability by interface matrix, cell by cell, under the default policy.

Capabilities: a harmless step, an http call, a shell program, a python call, a python
validator, a command validator. Callers: viewer, operator and admin keys over REST (runs
and jobs) and NATS (runs.start and execute), and the local command line. Every denied cell
is a 403 over REST or a ``policy_denied``/``forbidden`` error reply over NATS, with a
``denied`` entry on the audit trail naming the caller, and writes no run; every allowed cell
is accepted. The local command line may do everything (it already runs as its user).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from baton import Engine
from baton.api.auth import create_key
from baton.api.nats import NatsInterface
from tests.test_api import Server, baton, keyed_server
from tests.test_nats import Names, ask, error_code, names, nats_url

__all__ = ["names", "nats_url"]  # fixtures

CALLERS = ("viewer", "operator", "admin")
STEPS: dict[str, dict[str, Any]] = {
    "harmless": {"task": "echo", "with": {"text": "fine"}},
    "http": {"task": "http", "with": {"url": "http://127.0.0.1:9/"}},
    "shell": {"task": "shell", "with": {"argv": ["true"]}},
    "python": {"task": "python", "with": {"function": "os:getpid"}},
    "python validator": {"task": "echo", "validate": [{"kind": "python", "function": "copy:copy"}]},
    "command validator": {
        "task": "echo",
        "with": {"x": 1},
        "validate": [{"kind": "command", "argv": ["true"]}],
    },
}
#: the kinds that are a task alone, which a job or an execute call can be
TASKS = ("harmless", "http", "shell", "python")


def allowed(caller: str, kind: str) -> bool:
    return caller == "admin" or (caller == "operator" and kind in ("harmless", "http"))


def plan(kind: str, name: str) -> dict[str, Any]:
    return {"name": name, "steps": [{"id": "s", **STEPS[kind]}]}


def cell_name(interface: str, caller: str, kind: str) -> str:
    return f"{interface}-{caller}-{kind}".replace(" ", "_")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with keyed_server(tmp_path_factory.mktemp("matrix") / "baton.db", CALLERS) as server:
        yield server


def _denied(db: Path, actor: str) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT subject, detail FROM audit WHERE action = 'denied' AND actor = ?", (actor,)
        )
        return [(subject, json.loads(detail)) for subject, detail in rows]


def _runs_named(db: Path, name: str) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM runs WHERE name = ?", (name,)).fetchone()[0])


@pytest.mark.parametrize("caller", CALLERS)
def test_rest_runs(api: Server, caller: str) -> None:
    client = api.client(caller)
    actor = f"key:{api.keys[caller].split('_')[1]}"
    for kind in STEPS:
        name = cell_name("rest", caller, kind)
        answer = client.post("/runs", json=plan(kind, name))
        if allowed(caller, kind):
            assert answer.status_code == 202, (kind, answer.text)
            assert _runs_named(api.db, name) == 1
            continue
        assert answer.status_code == 403, (kind, answer.text)
        assert _runs_named(api.db, name) == 0
        denied = _denied(api.db, actor)
        if caller == "viewer":  # not a role that may start runs at all: the route refuses it
            assert answer.json()["code"] == "forbidden"
            assert any(subject == "/api/v1/runs" for subject, _ in denied), denied
        else:
            assert answer.json()["code"] == "policy_denied"
            assert any(subject == name and d["refused"] == "run.start" for subject, d in denied), denied


@pytest.mark.parametrize("caller", CALLERS)
def test_rest_jobs(api: Server, caller: str) -> None:
    client = api.client(caller)
    actor = f"key:{api.keys[caller].split('_')[1]}"
    for kind in TASKS:
        step = STEPS[kind]
        answer = client.post("/jobs", json={"task": step["task"], "input": step.get("with", {})})
        if allowed(caller, kind):
            assert answer.status_code == 202, (kind, answer.text)
            continue
        assert answer.status_code == 403, (kind, answer.text)
        denied = _denied(api.db, actor)
        if caller == "viewer":
            assert any(subject == "/api/v1/jobs" for subject, _ in denied), denied
        else:
            assert any(subject == step["task"] and d["refused"] == "job.enqueue" for subject, d in denied)


async def test_nats(tmp_path: Path, nats_url: str, names: Names) -> None:
    async with Engine(str(tmp_path / "baton.db"), poll_s=0.05, workdir=tmp_path) as engine:
        await engine.start_worker()
        tokens = {}
        actors = {}
        for caller in CALLERS:
            key, token = await create_key(engine.store, caller)
            tokens[caller], actors[caller] = token, f"key:{key.id}"
        async with NatsInterface(engine, nats_url, prefix=names.prefix, stream=names.stream) as interface:
            nc = await nats.connect(nats_url)
            try:
                refused: list[tuple[str, str, str]] = []
                for caller in CALLERS:
                    bearer = {"Authorization": f"Bearer {tokens[caller]}"}
                    for kind in STEPS:
                        name = cell_name("nats", caller, kind)
                        reply, msg = await ask(
                            nc, f"{interface.prefix}.runs.start", {"plan": plan(kind, name)}, bearer
                        )
                        if allowed(caller, kind):
                            assert "error" not in reply, (caller, kind, reply)
                        else:
                            code = error_code(reply, msg)
                            assert code == ("forbidden" if caller == "viewer" else "policy_denied"), reply
                            refused.append((caller, "run.start", name))
                    for kind in TASKS:
                        step = STEPS[kind]
                        call = {"task": step["task"], "input": step.get("with", {})}
                        reply, msg = await ask(nc, f"{interface.prefix}.execute", call, bearer)
                        if not allowed(caller, kind):
                            code = error_code(reply, msg)
                            assert code == ("forbidden" if caller == "viewer" else "policy_denied"), reply
                            refused.append((caller, "task.execute", step["task"]))
                        elif kind != "http":  # (the call runs: loopback is refused, as it should be)
                            assert "error" not in reply, (caller, kind, reply)
            finally:
                await nc.close()
        entries = [e for e in await engine.store.audit_entries(limit=10_000) if e.action == "denied"]
        runs = {r.name for r in await engine.store.list_runs(limit=1000)}
    for caller, action, subject in refused:
        mine = [e for e in entries if e.actor == actors[caller]]
        assert mine, (caller, action, subject)
        if caller != "viewer":
            assert any(e.subject == subject and e.detail.get("refused") == action for e in mine), subject
        assert action != "run.start" or subject not in runs


# (http has nothing to reach here: what it refuses, whoever asks, is tests/test_http_task.py)
@pytest.mark.parametrize("kind", sorted(set(STEPS) - {"http"}))
def test_the_local_command_line_may_do_everything(tmp_path: Path, kind: str) -> None:
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(plan(kind, "local")))
    done = baton("run", str(file), "--db", str(tmp_path / "baton.db"), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "completed"
