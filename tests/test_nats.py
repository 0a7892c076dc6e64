"""The NATS interface as a client meets it: a real nats-server with JetStream, a real client.

Each test uses subjects and a stream of its own (a random prefix), so runs of the suite and
other users of the server do not see each other. When the server is unreachable the tests
are skipped with the reason, unless ``BATON_REQUIRE_SERVICES=1``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from baton.api.auth import create_key
from baton.api.nats import NatsInterface, event_msg_id, serve_nats
from baton.engine import Engine
from baton.engine.events import Event
from tests.conftest import REQUIRE_SERVICES

NATS_URL = os.environ.get("BATON_TEST_NATS", "nats://127.0.0.1:4222")
BATON = [sys.executable, "-m", "baton"]
PLAN = {
    "name": "nats",
    "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}, {"id": "b", "task": "echo", "needs": ["a"]}],
}
SLOW = {
    "name": "slow",
    "policy": {"max_parallel": 1},
    "steps": [{"id": f"s{i}", "task": "sleep", "with": {"seconds": 0.3}} for i in range(6)],
}


@functools.cache
def _nats_problem() -> str | None:
    """Why the NATS server cannot serve these tests (None when it can)."""
    parts = urlsplit(NATS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=3) as s:
            s.settimeout(3)
            info = s.recv(4096)
    except OSError as exc:
        return str(exc) or type(exc).__name__
    if not info.startswith(b"INFO "):
        return "it does not speak the NATS protocol"
    if not json.loads(info[5:]).get("jetstream"):
        return "JetStream is not enabled (nats-server -js)"
    return None


@pytest.fixture
def nats_url() -> str:
    problem = _nats_problem()
    if problem is not None:
        message = f"NATS with JetStream at {NATS_URL} is unreachable: {problem}"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} (BATON_REQUIRE_SERVICES=1 requires it)")
        pytest.skip(message)
    return NATS_URL


@dataclass(frozen=True)
class Names:
    prefix: str
    stream: str

    @property
    def options(self) -> list[str]:
        return ["--prefix", self.prefix, "--stream", self.stream]


@pytest.fixture
async def names(nats_url: str) -> AsyncIterator[Names]:
    """A subject prefix and a stream name of this test's own (the stream deleted after)."""
    tag = uuid.uuid4().hex[:12]
    made = Names(prefix=f"t{tag}", stream=f"T{tag.upper()}_EVENTS")
    yield made
    nc = await nats.connect(nats_url)
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(made.stream)
    await nc.close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(str(tmp_path / "baton.db"), poll_s=0.05) as made:
        await made.start_worker()
        yield made


#: the operator key requests carry (made in each test's database by ``interface``)
KEY: dict[str, str] = {}


@pytest.fixture
async def interface(engine: Engine, nats_url: str, names: Names) -> AsyncIterator[NatsInterface]:
    _, KEY["token"] = await create_key(engine.store, "operator", "nats tests")
    async with NatsInterface(engine, nats_url, prefix=names.prefix, stream=names.stream) as made:
        yield made
    KEY.clear()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def ask(
    nc: NatsClient,
    subject: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    wait_s: float = 10.0,
) -> tuple[dict[str, Any], Msg]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if "token" in KEY:
        headers = {"Authorization": f"Bearer {KEY['token']}", **(headers or {})}
    msg = await nc.request(subject, data, timeout=wait_s, headers=headers)
    reply = json.loads(msg.data)
    assert isinstance(reply, dict)
    return reply, msg


async def until_stopped(nc: NatsClient, prefix: str, run_id: str, wait_s: float = 20.0) -> dict[str, Any]:
    """Ask for the run until it is no longer pending or running."""
    deadline = time.monotonic() + wait_s
    while True:
        run, _ = await ask(nc, f"{prefix}.runs.get", {"id": run_id})
        if run.get("status") not in ("pending", "running") or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.05)


def error_code(reply: dict[str, Any], msg: Msg | None = None) -> str:
    """The error reply's code (checked against its Error-Code header when ``msg`` is given)."""
    assert isinstance(reply.get("error"), dict), reply
    assert reply["error"]["message"], reply
    if msg is not None:
        assert msg.headers is not None
        assert msg.headers["Error-Code"] == reply["error"]["code"]
        assert msg.headers["Correlation-Id"] == reply["correlation_id"]
    return str(reply["error"]["code"])


# -- request-reply ----------------------------------------------------------------------------


async def test_start_then_get_until_completed(interface: NatsInterface, client: NatsClient) -> None:
    p = interface.prefix
    started, _ = await ask(client, f"{p}.runs.start", {"plan": PLAN})
    assert started["created"] is True
    assert started["status"] in ("pending", "running")
    run = await until_stopped(client, p, started["id"])
    assert run["status"] == "completed"
    assert run["id"] == started["id"] and run["name"] == "nats" and run["total_steps"] == 2
    assert [(s["id"], s["status"], s["output"]) for s in run["steps"]] == [
        ("a", "succeeded", {"x": 1}),
        ("b", "succeeded", {}),
    ]


async def test_start_with_an_idempotency_key(interface: NatsInterface, client: NatsClient) -> None:
    subject = f"{interface.prefix}.runs.start"
    first, _ = await ask(client, subject, {"plan": PLAN, "idempotency_key": "k1"})
    again, _ = await ask(client, subject, {"plan": PLAN, "idempotency_key": "k1"})
    assert (again["id"], again["created"]) == (first["id"], False)
    other, _ = await ask(client, subject, {"plan": {**PLAN, "name": "other"}, "idempotency_key": "k1"})
    assert error_code(other) == "conflict"


async def test_execute_echo_round_trip_with_correlation_ids(
    interface: NatsInterface, client: NatsClient
) -> None:
    subject = f"{interface.prefix}.execute"
    request = {"task": "echo", "input": {"text": "hi", "n": [1, 2]}}
    reply, msg = await ask(client, subject, request, headers={"Correlation-Id": "abc-1"})
    assert reply["result"] == {"text": "hi", "n": [1, 2]}
    assert reply["method"] == "executor"
    assert reply["metrics"]["duration_ms"] > 0
    assert reply["correlation_id"] == "abc-1"
    assert msg.headers is not None and msg.headers["Correlation-Id"] == "abc-1"

    # the body's field wins; then Correlation-Id, then Nats-Msg-Id
    reply, msg = await ask(
        client, subject, {**request, "correlation_id": "body-2"}, headers={"Correlation-Id": "head"}
    )
    assert reply["correlation_id"] == "body-2" and msg.headers == {"Correlation-Id": "body-2"}
    reply, msg = await ask(client, subject, request, headers={"Nats-Msg-Id": "msg-3"})
    assert reply["correlation_id"] == "msg-3" and msg.headers == {"Correlation-Id": "msg-3"}

    # none given: one is made, the same in body and header, a new one each time
    one, msg_one = await ask(client, subject, request)
    two, _ = await ask(client, subject, request)
    assert one["correlation_id"] and one["correlation_id"] != two["correlation_id"]
    assert msg_one.headers == {"Correlation-Id": one["correlation_id"]}


async def test_execute_goes_through_the_executor_and_its_policies(
    interface: NatsInterface, engine: Engine, client: NatsClient
) -> None:
    subject = f"{interface.prefix}.execute"
    timed_out, _ = await ask(
        client, subject, {"task": "sleep", "input": {"seconds": 5}, "timeout_s": 0.2, "correlation_id": "t"}
    )
    assert error_code(timed_out) == "task_failed"
    assert "timed out" in timed_out["error"]["message"] and timed_out["correlation_id"] == "t"

    retry = {"attempts": 3, "backoff_s": 0.01}
    retried, _ = await ask(client, subject, {"task": "fail", "input": {"times": 2}, "retry": retry})
    assert retried["result"] == {"attempt": 3}

    failed, _ = await ask(client, subject, {"task": "fail"})
    assert error_code(failed) == "task_failed"

    # each call is a run of one step, in the store like any other
    calls = [r for r in await engine.store.list_runs(100) if r.name.startswith("call:")]
    assert sorted(r.name for r in calls) == ["call:fail", "call:fail", "call:sleep"]


async def test_malformed_requests_get_error_replies(interface: NatsInterface, client: NatsClient) -> None:
    p = interface.prefix
    reply, msg = await ask(client, f"{p}.execute", b"{not json", headers={"Correlation-Id": "bad-1"})
    assert error_code(reply, msg) == "unreadable_body"
    assert reply["correlation_id"] == "bad-1"

    for subject in ("execute", "runs.start", "runs.get", "runs.pause", "runs.resume", "runs.cancel"):
        reply, _ = await ask(client, f"{p}.{subject}", b"[1, 2]")
        assert error_code(reply) == "unreadable_body", subject
        reply, msg = await ask(client, f"{p}.{subject}", b"")
        assert error_code(reply, msg) == "unreadable_body", subject

    missing, _ = await ask(client, f"{p}.execute", {"input": {}})
    assert error_code(missing) == "invalid_request"
    assert missing["error"]["problems"][0]["where"] == "task"

    typo, _ = await ask(client, f"{p}.execute", {"task": "echo", "inputs": {"x": 1}})
    assert error_code(typo) == "invalid_request"
    assert [q["where"] for q in typo["error"]["problems"]] == ["inputs"]

    policy, _ = await ask(client, f"{p}.execute", {"task": "echo", "timeout_s": -1})
    assert error_code(policy) == "invalid_request"
    assert [q["where"] for q in policy["error"]["problems"]] == ["timeout_s"]

    inputs, _ = await ask(client, f"{p}.execute", {"task": "sleep", "input": {"secs": 1}})
    assert error_code(inputs) == "invalid_request"
    assert {q["where"] for q in inputs["error"]["problems"]} == {"input"}
    assert any("missing input 'seconds'" in q["message"] for q in inputs["error"]["problems"])

    unknown, _ = await ask(client, f"{p}.execute", {"task": "no.such.task"})
    assert error_code(unknown) == "unknown_task"
    assert "echo" in unknown["error"]["message"]  # it says which tasks there are

    plan, _ = await ask(client, f"{p}.runs.start", {"plan": {"name": "x", "steps": [{"id": "a"}]}})
    assert error_code(plan) == "invalid_plan" and plan["error"]["problems"]

    no_plan, _ = await ask(client, f"{p}.runs.start", {"plan": "plan.yaml"})
    assert error_code(no_plan) == "invalid_request"

    for action in ("get", "pause", "resume", "cancel"):
        gone, _ = await ask(client, f"{p}.runs.{action}", {"id": "ffffffffffff00000000"})
        assert error_code(gone) == "not_found", action
        bad_id, _ = await ask(client, f"{p}.runs.{action}", {"id": "../x"})
        assert error_code(bad_id) == "invalid_request", action

    # after all that, it still answers
    ok, _ = await ask(client, f"{p}.execute", {"task": "echo", "input": {"still": "here"}})
    assert ok["result"] == {"still": "here"}


async def test_pause_resume_cancel_and_state_conflicts(interface: NatsInterface, client: NatsClient) -> None:
    p = interface.prefix
    started, _ = await ask(client, f"{p}.runs.start", {"plan": SLOW})
    run_id = started["id"]
    paused, _ = await ask(client, f"{p}.runs.pause", {"id": run_id})
    assert paused["status"] == "paused" and paused["id"] == run_id
    resumed, _ = await ask(client, f"{p}.runs.resume", {"id": run_id})
    assert resumed["status"] == "running"
    cancelled, _ = await ask(client, f"{p}.runs.cancel", {"id": run_id})
    assert cancelled["status"] == "cancelled"

    again, _ = await ask(client, f"{p}.runs.cancel", {"id": run_id})
    assert again["status"] == "cancelled"  # cancelling is idempotent
    for action in ("pause", "resume"):
        reply, msg = await ask(client, f"{p}.runs.{action}", {"id": run_id, "correlation_id": action})
        assert error_code(reply, msg) == "conflict", action
        assert "cancelled" in reply["error"]["message"]
        assert reply["correlation_id"] == action
    run = await until_stopped(client, p, run_id)
    assert run["status"] == "cancelled"
    # The trail says what came over NATS (the refused ones changed nothing: not on it), and
    # how the run ended (written a moment after the end).
    deadline = time.monotonic() + 30
    while True:
        trail = await interface.engine.store.audit_entries(subject=run_id)
        if (trail and trail[-1].action == "run.cancelled") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    key = f"key:{KEY['token'].split('_')[1]}"  # the key the requests carried
    assert [(e.actor, e.action) for e in trail] == [
        (key, "run.start"),
        (key, "run.pause"),
        (key, "run.resume"),
        (key, "run.cancel"),
        (key, "run.cancel"),
        ("system", "run.cancelled"),
    ]

    done, _ = await ask(client, f"{p}.runs.start", {"plan": PLAN})
    assert (await until_stopped(client, p, done["id"]))["status"] == "completed"
    for action in ("pause", "cancel", "resume"):
        reply, msg = await ask(client, f"{p}.runs.{action}", {"id": done["id"]})
        assert error_code(reply, msg) == "conflict", action
        assert "completed" in reply["error"]["message"]


async def test_requests_are_answered_concurrently(interface: NatsInterface, client: NatsClient) -> None:
    """A long execute does not hold up the requests behind it."""
    p = interface.prefix
    slow = asyncio.create_task(ask(client, f"{p}.execute", {"task": "sleep", "input": {"seconds": 1.5}}))
    await asyncio.sleep(0.1)
    began = time.monotonic()
    quick, _ = await ask(client, f"{p}.execute", {"task": "echo", "input": {"q": 1}})
    assert quick["result"] == {"q": 1}
    assert time.monotonic() - began < 1.0
    reply, _ = await slow
    assert reply["result"] == {"slept_s": 1.5}


# -- events ------------------------------------------------------------------------------------


async def read_events(nc: NatsClient, stream: str, subject: str, until_kind: str) -> list[Msg]:
    """The stream's messages on ``subject``, through a JetStream consumer, up to ``until_kind``."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, stream=stream)
    got: list[Msg] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.TimeoutError):
            for msg in await sub.fetch(100, timeout=1):
                await msg.ack()
                got.append(msg)
        if any(json.loads(m.data)["kind"] == until_kind for m in got):
            break
    await sub.unsubscribe()
    return got


async def test_run_events_land_in_jetstream_with_message_ids(
    interface: NatsInterface, client: NatsClient
) -> None:
    p, stream = interface.prefix, interface.stream
    started, _ = await ask(client, f"{p}.runs.start", {"plan": PLAN})
    run_id = started["id"]
    assert (await until_stopped(client, p, run_id))["status"] == "completed"

    msgs = await read_events(client, stream, f"{p}.events.{run_id}.>", "run.completed")
    events = [json.loads(m.data) for m in msgs]
    kinds = [(e["kind"], e["step_id"]) for e in events]
    assert kinds[0] == ("run.pending", None) and kinds[-1] == ("run.completed", None)
    assert ("step.succeeded", "a") in kinds and ("step.succeeded", "b") in kinds
    assert kinds.index(("step.succeeded", "a")) < kinds.index(("step.running", "b"))
    for msg, event in zip(msgs, events, strict=True):
        assert event["run_id"] == run_id
        assert msg.subject == f"{p}.events.{run_id}.{event['kind']}"
        assert msg.headers is not None
        assert (
            msg.headers["Nats-Msg-Id"] == f"{run_id}:{event['kind']}:{event['step_id'] or ''}:{event['ts']!r}"
        )
    assert len({m.headers["Nats-Msg-Id"] for m in msgs if m.headers}) == len(msgs)

    # the same event published again (a retry, another process) is stored once
    js = client.jetstream()
    before = (await js.stream_info(stream)).state.messages
    completed = msgs[-1]
    assert completed.headers is not None
    again = await js.publish(completed.subject, completed.data, headers=dict(completed.headers))
    assert again.duplicate is True
    assert (await js.stream_info(stream)).state.messages == before
    other = Event("run.completed", run_id, ts=events[-1]["ts"] + 1)
    fresh = await js.publish(completed.subject, b"{}", headers={"Nats-Msg-Id": event_msg_id(other)})
    assert not fresh.duplicate
    assert (await js.stream_info(stream)).state.messages == before + 1


async def test_events_of_runs_started_elsewhere_are_published(
    interface: NatsInterface, engine: Engine, client: NatsClient
) -> None:
    """Every event of the engine goes to the stream, whoever started the run."""
    record = await engine.run({"name": "direct", "steps": [{"id": "only", "task": "echo"}]})
    msgs = await read_events(client, interface.stream, f"{interface.prefix}.events.*.run.>", "run.completed")
    assert {json.loads(m.data)["run_id"] for m in msgs} == {record.id}
    assert [json.loads(m.data)["kind"] for m in msgs][-1] == "run.completed"


class Proxy:
    """A TCP relay to the NATS server that can be cut and restored: NATS going away and
    coming back, without touching the server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_nats_going_away_drops_events_and_blocks_nothing(
    engine: Engine, nats_url: str, names: Names, client: NatsClient
) -> None:
    parts = urlsplit(nats_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 4222))
    await proxy.open()
    url = f"nats://127.0.0.1:{proxy.port}"
    async with NatsInterface(engine, url, prefix=names.prefix, stream=names.stream, auth=False) as interface:
        subject = f"{names.prefix}.execute"
        assert (await ask(client, subject, {"task": "echo", "input": {"n": 1}}))[0]["result"] == {"n": 1}

        await proxy.cut()
        began = time.monotonic()
        record = await engine.run({"name": "offline", "steps": [{"id": "a", "task": "echo"}]})
        assert str(record.status) == "completed"
        assert time.monotonic() - began < 2.0  # the executor did not wait for NATS
        deadline = time.monotonic() + 5
        while interface.events_dropped == 0:
            assert time.monotonic() < deadline, "no event was dropped"
            await asyncio.sleep(0.05)

        await proxy.open()  # the same port: the client reconnects by itself
        deadline = time.monotonic() + 10
        while True:
            try:
                reply, _ = await ask(client, subject, {"task": "echo", "input": {"n": 2}}, wait_s=0.5)
                break
            except nats.errors.TimeoutError:  # no responders yet: still reconnecting
                assert time.monotonic() < deadline, "the interface did not come back"
                await asyncio.sleep(0.2)
            except nats.errors.NoRespondersError:
                assert time.monotonic() < deadline, "the interface did not come back"
                await asyncio.sleep(0.2)
        assert reply["result"] == {"n": 2}
    await proxy.cut()


async def test_serve_nats_runs_until_cancelled(
    engine: Engine, nats_url: str, names: Names, client: NatsClient
) -> None:
    started = asyncio.Event()
    task = asyncio.create_task(
        serve_nats(engine, nats_url, prefix=names.prefix, stream=names.stream, started=started, auth=False)
    )
    await asyncio.wait_for(started.wait(), 10)
    reply, _ = await ask(client, f"{names.prefix}.execute", {"task": "echo", "input": {"a": 1}})
    assert reply["result"] == {"a": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(nats.errors.NoRespondersError):
        await client.request(f"{names.prefix}.execute", b"{}", timeout=1)


async def test_an_unreachable_server_is_an_error_at_start(engine: Engine) -> None:
    from baton.api.nats import NatsUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    interface = NatsInterface(engine, f"nats://127.0.0.1:{port}", connect_timeout_s=1)
    with pytest.raises(NatsUnavailable, match="cannot connect to NATS"):
        await interface.start()


# -- the command -------------------------------------------------------------------------------


@pytest.fixture
def nats_process(tmp_path: Path, nats_url: str, names: Names) -> Iterator[subprocess.Popen[str]]:
    made = subprocess.run(
        [*BATON, "keys", "create", "--role", "operator", "--db", str(tmp_path / "b.db"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    KEY["token"] = json.loads(made.stdout)["token"]
    proc = subprocess.Popen(
        [*BATON, "nats", "--db", str(tmp_path / "b.db"), "--url", nats_url, *names.options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    KEY.clear()
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


async def test_baton_nats_command(
    nats_process: subprocess.Popen[str], names: Names, client: NatsClient
) -> None:
    p = names.prefix
    deadline = time.monotonic() + 30
    while True:  # until it answers
        assert nats_process.poll() is None, nats_process.communicate()[1]
        try:
            reply, msg = await ask(
                client, f"{p}.execute", {"task": "echo", "input": {"up": True}}, wait_s=0.5
            )
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            assert time.monotonic() < deadline, "baton nats did not answer"
            await asyncio.sleep(0.2)
    assert reply["result"] == {"up": True}
    assert msg.headers == {"Correlation-Id": reply["correlation_id"]}

    started, _ = await ask(client, f"{p}.runs.start", {"plan": PLAN})
    assert (await until_stopped(client, p, started["id"]))["status"] == "completed"
    msgs = await read_events(client, names.stream, f"{p}.events.{started['id']}.>", "run.completed")
    assert json.loads(msgs[-1].data)["kind"] == "run.completed"

    nats_process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(nats_process.communicate, timeout=30)
    assert nats_process.returncode == 0, stderr
    assert "baton nats stopped" in stderr


async def test_baton_serve_answers_on_nats_beside_http(
    tmp_path: Path, nats_url: str, client: NatsClient
) -> None:
    """`baton serve --nats`: one engine behind both interfaces (default subjects)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(  # noqa: ASYNC220 (a server process for the test's whole length)
        [
            *BATON,
            "serve",
            "--db",
            str(tmp_path / "s.db"),
            "--port",
            str(port),
            "--no-auth",
            "--nats",
            nats_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                reply, _ = await ask(
                    client, "baton.execute", {"task": "echo", "input": {"via": "nats"}}, wait_s=0.5
                )
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < deadline, "baton serve --nats did not answer on NATS"
                await asyncio.sleep(0.2)
        assert reply["result"] == {"via": "nats"}
        started, _ = await ask(client, "baton.runs.start", {"plan": PLAN})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1") as http:
            deadline = time.monotonic() + 20
            while (run := (await http.get(f"/runs/{started['id']}")).json())["status"] != "completed":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert [s["status"] for s in run["steps"]] == ["succeeded"] * len(run["steps"])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
