"""Roles that bind: what an API key's holder may run, over REST and NATS, against a real
server; the local command line keeps its power.

The matrix: each kind of step that runs code (a shell or python task, a python or command
validator) and a harmless one, by caller (viewer, operator, admin key; a server without
keys; NATS). A refusal is a 403 (an error reply over NATS) naming every offending step,
with a ``denied`` audit entry, and writes no run.
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
from baton.errors import PolicyDenied, UsageError
from baton.plan.model import Plan
from baton.policy import Policy
from baton.tasks.registry import Registry
from tests.test_api import Server, baton, keyed_server, start, stop, wait_run
from tests.test_nats import Names, ask, error_code, names, nats_url

__all__ = ["names", "nats_url"]  # fixtures

SHELL = {"id": "sh", "task": "shell", "with": {"argv": ["sh", "-c", "id > owned"]}}
PYTHON = {"id": "py", "task": "python", "with": {"function": "os.system", "args": ["id"]}}
PY_CHECK = {"id": "pv", "task": "echo", "validate": [{"kind": "python", "function": "os:getcwd"}]}
COMMAND_CHECK = {"id": "cv", "task": "echo", "validate": [{"kind": "command", "argv": ["true"]}]}
HARMLESS = {"id": "ok", "task": "echo", "with": {"text": "fine"}}
CODE = {"shell": SHELL, "python": PYTHON, "python validator": PY_CHECK, "command validator": COMMAND_CHECK}


def plan(*steps: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


# -- the policy itself --------------------------------------------------------------------------


def check(data: dict[str, Any], role: str, policy: Policy | None = None) -> list[str]:
    registry = Registry.default()
    return [str(p) for p in (policy or Policy()).check_plan(Plan.model_validate(data), registry, role)]


@pytest.mark.parametrize("kind", sorted(CODE))
def test_an_operator_may_not_run_code_an_admin_may(kind: str) -> None:
    problems = check(plan(HARMLESS, CODE[kind]), "operator")
    assert len(problems) == 1 and problems[0].startswith("steps[1]: step ")
    assert "which role 'coder' may not use" in problems[0]
    assert check(plan(HARMLESS, CODE[kind]), "admin") == []


def test_roles_a_key_may_not_grant_are_refused_and_a_policy_can_grant_more(tmp_path: Path) -> None:
    as_admin = {**SHELL, "role": "admin"}
    assert check(plan(as_admin), "operator") == [
        "steps[0]: step 'sh': an operator key may not grant role 'admin'"
    ]
    assert check(plan(HARMLESS), "viewer") == ["steps[0]: step 'ok': a viewer key may not grant any role"]
    file = tmp_path / "policy.yaml"
    file.write_text("roles:\n  tester: {capabilities: [pure, llm, http, shell]}\n")
    granted = Policy.load(file)
    # shell granted, but not shells and interpreters unless the policy lists them
    assert check(plan({**SHELL, "role": "tester"}), "operator", granted) == [
        "steps[0]: step 'sh': 'sh' runs whatever it is given;"
        " the role may start it only if its policy names it"
    ]
    assert check(plan({**SHELL, "role": "tester", "with": {"argv": ["true"]}}), "operator", granted) == []
    file.write_text("roles:\n  tester: {capabilities: [pure, llm, http, shell], programs: [sh]}\n")
    granted = Policy.load(file)
    assert check(plan({**SHELL, "role": "tester"}), "operator", granted) == []
    assert check(plan(SHELL), "operator", granted) != []  # the default role is still coder
    file.write_text("roles:\n  tester: {capabilities: [rm-rf]}\n")
    with pytest.raises(UsageError, match="unknown capabilities"):
        Policy.load(file)


async def test_the_engine_refuses_before_writing_and_audits_the_denial(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "baton.db"), workdir=tmp_path) as engine:
        with pytest.raises(PolicyDenied) as refused:
            await engine.submit(plan(HARMLESS, SHELL, PYTHON), key_role="operator", actor="key:abc")
        assert [p.where for p in refused.value.problems] == ["steps[1]", "steps[2]"]
        with pytest.raises(PolicyDenied):
            await engine.enqueue("shell", {"argv": ["id"]}, key_role="operator", actor="key:abc")
        with pytest.raises(PolicyDenied):
            await engine.execute("python", {"function": "os.getpid"}, key_role="operator", actor="nats")
        assert await engine.store.list_runs() == [] and await engine.store.list_jobs() == []
        denied = [e for e in await engine.store.audit_entries() if e.action == "denied"]
        assert [(e.actor, e.subject, e.detail["refused"]) for e in denied] == [
            ("key:abc", "p", "run.start"),
            ("key:abc", "shell", "job.enqueue"),
            ("nats", "python", "task.execute"),
        ]
        # A local caller (no key) keeps its power.
        assert (await engine.run(plan(HARMLESS, {**SHELL, "with": {"argv": ["true"]}}))).status == "completed"
    assert not (tmp_path / "owned").exists()


# -- over REST, against a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with keyed_server(
        tmp_path_factory.mktemp("policy") / "baton.db", ("viewer", "operator", "admin")
    ) as server:
        yield server


def _runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


@pytest.mark.parametrize("kind", sorted(CODE))
def test_rest_operators_get_403_naming_the_steps_admins_may(api: Server, kind: str) -> None:
    before = _runs(api.db)
    refused = api.client("operator").post("/runs", json=plan(HARMLESS, CODE[kind], name=f"deny-{kind}"))
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["code"] == "policy_denied"
    assert [p["where"] for p in body["problems"]] == ["steps[1]"]
    assert _runs(api.db) == before  # nothing written
    entries = api.client("admin").get("/audit", params={"limit": 1000}).json()
    assert any(e["action"] == "denied" and e["subject"] == f"deny-{kind}" for e in entries)
    safe = {**CODE[kind], "with": {"argv": ["true"]}} if kind == "shell" else CODE[kind]
    if kind == "python":
        safe = {**PYTHON, "with": {"function": "os.getpid"}}
    accepted = api.client("admin").post("/runs", json=plan(HARMLESS, safe, name=f"admin-{kind}"))
    assert accepted.status_code == 202, accepted.text
    assert wait_run(api.client("admin"), accepted.json()["id"])["status"] in ("completed", "failed")


def test_rest_jobs_of_code_running_tasks_are_refused_to_operators(api: Server) -> None:
    refused = api.client("operator").post("/jobs", json={"task": "shell", "input": {"argv": ["id"]}})
    assert refused.status_code == 403 and refused.json()["code"] == "policy_denied"
    assert api.client("operator").post("/jobs", json={"task": "echo", "input": {}}).status_code == 202


def test_a_server_without_keys_gives_no_one_shell(tmp_path: Path) -> None:
    proc, url = start(tmp_path / "baton.db", "--no-auth")
    try:
        server = Server(url, {}, tmp_path / "baton.db")
        refused = server.client(None).post("/runs", json=plan(SHELL))
        assert refused.status_code == 403, refused.text
        assert server.client(None).post("/runs", json=plan(HARMLESS)).status_code == 202
        server.close_clients()
    finally:
        stop(proc)
    assert not (tmp_path / "owned").exists()


def test_the_local_command_line_keeps_its_power(tmp_path: Path) -> None:
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(plan({**SHELL, "with": {"argv": ["sh", "-c", "echo local"]}})))
    done = baton("run", str(file), "--db", str(tmp_path / "baton.db"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"][0]["output"]["stdout"] == "local\n"


# -- over NATS --------------------------------------------------------------------------------


async def test_nats_callers_may_not_run_code(tmp_path: Path, nats_url: str, names: Names) -> None:
    async with Engine(str(tmp_path / "baton.db"), poll_s=0.05, workdir=tmp_path) as engine:
        await engine.start_worker()
        key, token = await create_key(engine.store, "operator")
        bearer = {"Authorization": f"Bearer {token}"}
        async with NatsInterface(engine, nats_url, prefix=names.prefix, stream=names.stream) as interface:
            nc = await nats.connect(nats_url)
            try:
                start = f"{interface.prefix}.runs.start"
                started, _ = await ask(nc, start, {"plan": plan(HARMLESS, SHELL)}, bearer)
                assert error_code(started) == "policy_denied", started
                execute = f"{interface.prefix}.execute"
                executed, _ = await ask(nc, execute, {"task": "shell", "input": SHELL["with"]}, bearer)
                assert error_code(executed) == "policy_denied", executed
                fine, _ = await ask(nc, execute, {"task": "echo", "input": {"a": 1}}, bearer)
                assert fine["result"] == {"a": 1}
            finally:
                await nc.close()
        denied = [e for e in await engine.store.audit_entries() if e.action == "denied"]
        actor = f"key:{key.id}"
        assert [(e.actor, e.detail["refused"]) for e in denied] == [
            (actor, "run.start"),
            (actor, "task.execute"),
        ]
    assert not (tmp_path / "owned").exists()


def test_a_policy_file_given_to_serve_grants_more(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("roles:\n  tester: {capabilities: [pure, llm, http, shell]}\n")
    db = tmp_path / "baton.db"
    made = baton("keys", "create", "--role", "operator", "--db", str(db), "--json")
    token = json.loads(made.stdout)["token"]
    proc, url = start(db, "--policy", str(policy))
    try:
        server = Server(url, {"operator": token}, db)
        tester = {**SHELL, "role": "tester", "with": {"argv": ["true"]}}
        accepted = server.client("operator").post("/runs", json=plan(tester))
        assert accepted.status_code == 202, accepted.text
        assert wait_run(server.client("operator"), accepted.json()["id"])["status"] == "completed"
        assert server.client("operator").post("/runs", json=plan(SHELL)).status_code == 403
        server.close_clients()
    finally:
        stop(proc)
