"""The REST API as a client meets it: a real `baton serve` process, a real HTTP client."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

BATON = [sys.executable, "-m", "baton"]
PLAN = {
    "name": "api",
    "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}, {"id": "b", "task": "echo", "needs": ["a"]}],
}
SLOW = {
    "name": "slow",
    "policy": {"max_parallel": 1},
    "steps": [{"id": f"s{i}", "task": "sleep", "with": {"seconds": 0.3}} for i in range(6)],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def baton(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BATON, *args], capture_output=True, text=True, timeout=60, env=env)


@dataclass
class Server:
    url: str
    keys: dict[str, str]  # role -> token
    db: Path
    made: list[httpx.Client] = field(default_factory=list)
    pid: int = 0  # the server's process

    def client(self, role: str | None = "operator", token: str | None = None) -> httpx.Client:
        """A client with the key of ``role`` (or ``token``; none with both None), closed after
        the test."""
        headers = {}
        if token is not None or role is not None:
            headers["Authorization"] = f"Bearer {token or self.keys[str(role)]}"
        client = httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=15)
        self.made.append(client)
        return client

    def close_clients(self) -> None:
        while self.made:
            self.made.pop().close()


def start(db: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [*BATON, "serve", "--db", str(db), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"baton serve exited {proc.returncode}: {err}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.communicate()
    raise AssertionError("baton serve did not answer within 30 s")


@contextlib.contextmanager
def keyed_server(db: Path, roles: Iterable[str], *extra: str) -> Iterator[Server]:
    """`baton serve` on ``db`` (its extra options ``extra``) with a key of each role."""
    keys = {}
    for role in roles:
        made = baton("keys", "create", "--role", role, "--db", str(db), "--json")
        assert made.returncode == 0, made.stderr
        keys[role] = json.loads(made.stdout)["token"]
    proc, url = start(db, *extra)
    try:
        yield Server(url, keys, db, pid=proc.pid)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("api") / "baton.db"
    keys = {}
    for role in ("viewer", "operator", "admin"):
        made = baton("keys", "create", "--role", role, "--name", f"test {role}", "--db", str(db), "--json")
        assert made.returncode == 0, made.stderr
        keys[role] = json.loads(made.stdout)["token"]
    proc, url = start(db)
    try:
        yield Server(url, keys, db)
    finally:
        stop(proc)


@pytest.fixture(autouse=True)
def _close_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").close_clients()


def wait_run(client: httpx.Client, run_id: str, statuses: tuple[str, ...] = ("completed", "failed")) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = client.get(f"/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not reach {statuses}")


def test_health_needs_no_key_and_counts_the_worker(server: Server) -> None:
    got = httpx.get(f"{server.url}/api/v1/health")
    assert got.status_code == 200
    assert got.json()["status"] == "ok" and got.json()["workers"] >= 1


def test_keys_and_roles(server: Server) -> None:
    anonymous = server.client(None)
    refused = anonymous.get("/runs")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["code"] == "unauthenticated"
    assert server.client(token="baton_0000000000_forged").get("/runs").status_code == 401
    viewer = server.client("viewer")
    assert viewer.get("/runs").status_code == 200
    forbidden = viewer.post("/runs", json=PLAN)
    assert forbidden.status_code == 403 and "needs operator" in forbidden.json()["message"]
    assert server.client("operator").get("/keys").status_code == 403
    # An admin makes and revokes keys; a revoked key is refused at once.
    admin = server.client("admin")
    made = admin.post("/keys", json={"role": "viewer", "name": "temp"})
    assert made.status_code == 201
    token = made.json()["token"]
    assert server.client(token=token).get("/runs").status_code == 200
    assert admin.post(f"/keys/{made.json()['id']}/revoke").json()["revoked_at"] is not None
    assert server.client(token=token).get("/runs").status_code == 401
    assert admin.post(f"/keys/{made.json()['id']}/revoke").status_code == 409
    listed = {k["id"]: k for k in admin.get("/keys").json()}
    assert made.json()["id"] in listed and "token" not in listed[made.json()["id"]]


def test_start_a_run_and_follow_it(server: Server) -> None:
    client = server.client()
    started = client.post("/runs", json=PLAN)
    assert started.status_code == 202
    body = started.json()
    assert body["created"] is True and started.headers["location"] == f"/api/v1/runs/{body['id']}"
    run = wait_run(client, body["id"])
    assert run["status"] == "completed" and [s["status"] for s in run["steps"]] == ["succeeded"] * 2
    progress = client.get(body["links"]["progress"].removeprefix("/api/v1")).json()
    assert (progress["percent"], progress["counts"]["succeeded"], progress["current_waves"]) == (100.0, 2, [])
    step = client.get(f"/runs/{body['id']}/steps/a").json()
    assert step["output"] == {"x": 1} and [a["status"] for a in step["attempt_history"]] == ["succeeded"]
    assert [s["id"] for s in client.get(f"/runs/{body['id']}/waves/1").json()["steps"]] == ["b"]
    listed = client.get("/runs", params={"status": "completed", "limit": 50}).json()["runs"]
    assert body["id"] in [r["id"] for r in listed]


def test_a_yaml_plan(server: Server) -> None:
    client = server.client()
    started = client.post("/runs", content=yaml.safe_dump(PLAN), headers={"Content-Type": "application/yaml"})
    assert started.status_code == 202
    assert wait_run(client, started.json()["id"])["status"] == "completed"


def test_an_idempotency_key_gives_one_run(server: Server) -> None:
    client = server.client()
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = client.post("/runs", json=PLAN, headers=key).json()
    again = client.post("/runs", json=PLAN, headers=key)
    assert again.status_code == 202 and again.json()["id"] == first["id"] and again.json()["created"] is False
    other = client.post("/runs", json={**PLAN, "name": "another"}, headers=key)
    assert other.status_code == 409 and "was used for another request" in other.json()["message"]


def test_bad_input_is_refused_with_the_problem_named(server: Server) -> None:
    client = server.client()
    before = len(client.get("/runs", params={"limit": 500}).json()["runs"])
    invalid = client.post("/runs", json={"name": "bad", "steps": [{"id": "a", "task": "nope"}]})
    assert invalid.status_code == 422
    assert any("unknown task 'nope'" in p["message"] for p in invalid.json()["problems"])
    unreadable = client.post("/runs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert unreadable.status_code == 400 and unreadable.json()["code"] == "unreadable_body"
    assert client.post("/runs", json=[1, 2]).status_code == 422
    assert client.post("/runs", content=b"").status_code == 400
    assert len(client.get("/runs", params={"limit": 500}).json()["runs"]) == before  # nothing written
    assert client.get("/runs/nosuchrun").status_code == 404
    assert client.get("/runs", params={"limit": 0}).status_code == 422
    assert client.post("/jobs", json={"task": "echo", "max_attempts": 0}).status_code == 422
    assert client.post("/jobs", json={"task": "nope"}).status_code == 400
    assert client.post("/jobs", json={"task": "echo", "run_at": 1e300}).status_code == 422  # no date


def test_pause_resume_cancel(server: Server) -> None:
    client = server.client()
    run_id = client.post("/runs", json=SLOW).json()["id"]
    paused = client.post(f"/runs/{run_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    time.sleep(0.5)  # the step that was running finishes; nothing new starts
    done_while_paused = client.get(f"/runs/{run_id}/progress").json()["counts"]["succeeded"]
    time.sleep(0.7)
    assert client.get(f"/runs/{run_id}/progress").json()["counts"]["succeeded"] == done_while_paused < 6
    assert client.post(f"/runs/{run_id}/resume").json()["status"] == "running"
    assert wait_run(client, run_id)["status"] == "completed"
    assert client.post(f"/runs/{run_id}/pause").status_code == 409  # it ended
    # The run's event stream, read afterwards, has the pause and the resume, by whom, in place.
    kinds = [e["kind"] for e in read_events(server, run_id) if e["kind"].startswith("run.")]
    assert kinds == ["run.pending", "run.running", "run.paused", "run.resumed", "run.completed"]
    control = [e["data"] for e in read_events(server, run_id) if e["kind"] in ("run.paused", "run.resumed")]
    operator_key = server.keys["operator"].split("_")[1]
    assert [c["by"] for c in control] == [f"key:{operator_key}"] * 2
    other = client.post("/runs", json=SLOW).json()["id"]
    assert client.post(f"/runs/{other}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/runs/{other}/resume").status_code == 409


def read_events(server: Server, run_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    """The SSE stream of a run, to its end: each event's id, kind and data."""
    headers = {"Authorization": f"Bearer {server.keys['viewer']}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[dict[str, Any]] = []
    url = f"{server.url}/api/v1/runs/{run_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                current["id"] = line[4:]
            elif line.startswith("event: "):
                current["kind"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif not line and current:
                events.append(current)
                current = {}
    return events


def test_live_events_over_sse_and_resuming_from_the_last_id(server: Server) -> None:
    plan = {
        "name": "events",
        "steps": [
            {
                "id": "flaky",
                "task": "fail",
                "with": {"times": 1},
                "retry": {"attempts": 2, "backoff_s": 0.05},
            },
            {"id": "slow", "task": "sleep", "with": {"seconds": 0.3}, "needs": ["flaky"]},
            {"id": "broken", "task": "fail", "needs": ["flaky"]},
            {"id": "after", "task": "echo", "needs": ["broken"]},
        ],
    }
    run_id = server.client().post("/runs", json=plan).json()["id"]
    events = read_events(server, run_id)  # follows the run live, to its end
    seen = [(e["kind"], e["data"].get("step_id")) for e in events]
    assert seen[:2] == [("run.pending", None), ("run.running", None)]
    assert seen[-1] == ("run.failed", None)
    flaky = [k for k, step in seen if step == "flaky"]
    assert flaky == ["step.running", "step.retrying", "step.running", "step.succeeded"]
    assert [k for k, step in seen if step == "slow"] == ["step.running", "step.succeeded"]
    assert [k for k, step in seen if step == "broken"] == ["step.running", "step.failed"]
    assert [k for k, step in seen if step == "after"] == ["step.skipped"]
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    # Reconnecting with the last id seen gives what came after it, and nothing twice.
    rest = read_events(server, run_id, last_event_id=ids[3])
    assert [e["id"] for e in rest] == ids[4:]
    assert read_events(server, run_id, last_event_id=ids[-1]) == []
    bad = server.client("viewer").get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and bad.json()["code"] == "bad_event_id"
    assert server.client("viewer").get("/runs/nosuchrun/events").status_code == 404


def test_a_pause_from_the_command_line_reaches_a_live_stream(server: Server) -> None:
    client = server.client()
    run_id = client.post("/runs", json=SLOW).json()["id"]
    followed: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: followed.extend(read_events(server, run_id)))
    reader.start()
    time.sleep(0.3)
    paused = baton("pause", run_id, "--db", str(server.db))  # another process, same database
    assert paused.returncode == 0, paused.stderr
    time.sleep(1.0)
    assert client.post(f"/runs/{run_id}/resume").status_code == 200
    reader.join(timeout=30)
    assert not reader.is_alive()
    # One stream, open since before the pause: it saw the other process's pause in the store.
    control = [(e["kind"], e["data"]["by"].split(":")[0]) for e in followed if "by" in e["data"]]
    assert control == [("run.paused", "cli"), ("run.resumed", "key")]
    assert followed[-1]["kind"] == "run.completed"


def test_jobs(server: Server) -> None:
    client = server.client()
    job = client.post("/jobs", json={"task": "echo", "input": {"n": 5}, "unique_key": f"j-{time.time_ns()}"})
    assert job.status_code == 202
    job_id = job.json()["id"]
    deadline = time.monotonic() + 20
    while client.get(f"/jobs/{job_id}").json()["state"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get(f"/jobs/{job_id}").json()["output"] == {"n": 5}
    assert job_id in [j["id"] for j in client.get("/jobs", params={"state": "completed"}).json()["jobs"]]
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert client.get("/jobs/999999999").status_code == 404


def test_no_auth_only_on_loopback(tmp_path: Path) -> None:
    refused = baton("serve", "--db", str(tmp_path / "x.db"), "--no-auth", "--host", "0.0.0.0")
    assert refused.returncode == 2
    assert "--no-auth would open 0.0.0.0 to anyone" in refused.stderr + refused.stdout
    proc, url = start(tmp_path / "y.db", "--no-auth")
    try:
        assert httpx.get(f"{url}/api/v1/runs").status_code == 200
    finally:
        stop(proc)


def test_the_openapi_document_lists_every_endpoint(server: Server) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/progress",
        "/api/v1/runs/{run_id}/waves/{wave}",
        "/api/v1/runs/{run_id}/steps/{step_id}",
        "/api/v1/runs/{run_id}/pause",
        "/api/v1/runs/{run_id}/resume",
        "/api/v1/runs/{run_id}/cancel",
        "/api/v1/jobs",
        "/api/v1/health",
    } <= paths


def test_prometheus_metrics_count_what_ran(server: Server) -> None:
    client = server.client()
    run_id = client.post("/runs", json=PLAN).json()["id"]
    wait_run(client, run_id)
    assert server.client(None).get("/metrics").status_code == 401
    scraped = server.client("viewer").get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in scraped.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['baton_step_attempts_total{outcome="succeeded",task="echo"}'] >= 2
    assert values['baton_runs_total{status="completed"}'] >= 1
    assert values['baton_step_duration_seconds_count{task="echo"}'] >= 2
    assert values["baton_steps_running"] >= 0
    assert values["baton_workers_alive"] >= 1
    # A job due in an hour waits as scheduled in its queue.
    client.post("/jobs", json={"task": "echo", "delay_s": 3600, "queue": "later"})
    scraped = server.client("viewer").get("/metrics").text
    assert 'baton_queue_depth{queue="later",state="scheduled"} 1.0' in scraped


def test_the_audit_trail_says_who_did_what_and_verifies(server: Server, tmp_path: Path) -> None:
    operator, viewer = server.client("operator"), server.client("viewer")
    ids = {role: token.split("_")[1] for role, token in server.keys.items()}
    run_id = operator.post("/runs", json=SLOW).json()["id"]
    operator.post(f"/runs/{run_id}/pause")
    assert viewer.post(f"/runs/{run_id}/resume").status_code == 403  # denied, and on record
    operator.post(f"/runs/{run_id}/cancel")
    paused = baton("pause", run_id, "--db", str(server.db))  # from the command line: ended already
    assert paused.returncode == 2
    # What the run went through, and who did it
    deadline = time.monotonic() + 10
    while True:
        listed = baton("audit", "list", "--run", run_id, "--db", str(server.db), "--json")
        entries = json.loads(listed.stdout)
        if any(e["action"] == "run.cancelled" for e in entries) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    actions = [(e["actor"], e["action"]) for e in entries]
    operator_actor = f"key:{ids['operator']}"
    assert actions == [
        (operator_actor, "run.start"),
        (operator_actor, "run.pause"),
        (operator_actor, "run.cancel"),
        ("system", "run.cancelled"),
    ]
    denied = [
        e
        for e in server.client("admin").get("/audit", params={"limit": 1000}).json()
        if e["action"] == "denied"
    ]
    assert any(
        e["actor"] == f"key:{ids['viewer']}" and e["subject"] == f"/api/v1/runs/{run_id}/resume"
        for e in denied
    )
    assert server.client("operator").get("/audit").status_code == 403
    verified = baton("audit", "verify", "--db", str(server.db), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True
    # A copy of the database with one entry changed: the chain breaks there.
    copy = tmp_path / "copy.db"
    with sqlite3.connect(server.db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    shutil.copy(server.db.parent / "audit.key", tmp_path / "audit.key")  # its key with it
    with sqlite3.connect(copy) as db:
        seq = db.execute(
            "SELECT seq FROM audit WHERE action = 'run.pause' AND subject = ?", (run_id,)
        ).fetchone()[0]
        db.execute("UPDATE audit SET actor = 'somebody else' WHERE seq = ?", (seq,))
    broken = baton("audit", "verify", "--db", str(copy))
    assert broken.returncode == 1 and f"broken at entry {seq}" in broken.stdout
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE audit SET actor = ? WHERE seq = ?", (operator_actor, seq))  # put back
        db.execute("DELETE FROM audit WHERE seq = ?", (seq,))  # and remove it instead
    removed = baton("audit", "verify", "--db", str(copy), "--json")
    assert removed.returncode == 1 and json.loads(removed.stdout)["broken_at"] > seq


CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis_run(server: Server, *headers: str) -> subprocess.CompletedProcess[str]:
    """Schemathesis against the running server's OpenAPI document: every operation, examples
    generated from the document (coverage, fuzzing and stateful phases)."""
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "15",
        "--seed",
        "7",
        *[arg for header in headers for arg in ("-H", header)],
        *(["--exclude-path-regex", "revoke"] if headers else []),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=server.db.parent)


def test_schemathesis_with_a_key_finds_no_5xx_and_no_answer_off_the_document(server: Server) -> None:
    # An admin key of its own, and revoking is left out: it would revoke the key it runs with.
    made = baton("keys", "create", "--role", "admin", "--db", str(server.db), "--json")
    token = json.loads(made.stdout)["token"]
    done = schemathesis_run(server, f"Authorization: Bearer {token}")
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "Authentication failed" not in done.stdout


def test_schemathesis_without_a_key_finds_no_5xx_and_no_answer_off_the_document(server: Server) -> None:
    done = schemathesis_run(server)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout
