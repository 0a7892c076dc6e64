"""Goals from every interface: REST (a real `baton serve` process) and NATS
(`execution.request` on a real nats-server, in the shapes of the system baton replaces)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client as NatsClient

from baton.api.auth import create_key
from baton.api.nats import NatsInterface
from baton.engine import Engine
from tests.agents.test_goals import config
from tests.test_api import Server, keyed_server
from tests.test_nats import nats_url  # noqa: F401  (the fixture: skips or fails without a server)


def llm_file(tmp_path: Path) -> Path:
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path).model_dump(exclude={"base_dir"})))
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`baton serve` with the goals' LLM config, a viewer and an operator key; its clients
    closed after the test."""
    with keyed_server(tmp_path / "api.db", ("viewer", "operator"), "--llm", str(llm_file(tmp_path))) as made:
        try:
            yield made
        finally:
            made.close_clients()


def test_a_goal_over_rest_is_accepted_then_followed_to_its_result(server: Server) -> None:
    operator, viewer = server.client("operator"), server.client("viewer")
    body = {
        "task": "Create a NATS consumer for user events",
        "language": "elixir",
        "complexity": "medium",
    }
    made = operator.post("/goals", json=body, headers={"Idempotency-Key": "goal-1"})
    assert made.status_code == 202, made.text
    goal = made.json()
    assert goal["task_type"] == "nats_consumer" and made.headers["Location"] == f"/api/v1/goals/{goal['id']}"
    again = operator.post("/goals", json=body, headers={"Idempotency-Key": "goal-1"})
    assert (again.json()["id"], again.json()["created"]) == (goal["id"], False)
    deadline = time.monotonic() + 30
    while (result := viewer.get(f"/goals/{goal['id']}").json())["status"] in ("pending", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert result["status"] == "completed" and result["template_used"] == goal["template"]
    assert result["metrics"]["success"] is True and result["model_used"] == "gpt-4o-mini"
    assert viewer.get(f"/runs/{goal['id']}").json()["status"] == "completed"  # the run's endpoints
    stats = viewer.get("/stats").json()
    assert stats["total_executions"] == 1 and stats["template_usage"] == {goal["template"]: 1}
    # a viewer may read but not start; bad input is named and starts nothing
    assert viewer.post("/goals", json=body).status_code == 403
    for bad, status in (
        ({"task": ""}, 422),
        ({"task": "x" * 20_001}, 422),
        ({"task": "Add tests", "language": "cobol"}, 422),
        ({"task": "Add tests", "complexity": "huge"}, 422),
        ({"task": "Add tests", "context": {"colour": "red"}}, 422),
    ):
        refused = operator.post("/goals", json=bad)
        assert refused.status_code == status, (bad, refused.text)
        assert "Traceback" not in refused.text and refused.json()["message"]
    assert len(viewer.get("/runs").json()["runs"]) == 1
    assert viewer.get("/goals/nope").status_code == 404


@pytest.fixture
async def goal_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(str(tmp_path / "n.db"), poll_s=0.05, llm=config(tmp_path), workdir=tmp_path) as made:
        await made.start_worker()
        yield made


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[NatsClient]:  # noqa: F811
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def ask(nc: NatsClient, subject: str, data: bytes, token: str, cid: str) -> tuple[dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {token}", "Correlation-Id": cid}
    msg = await nc.request(subject, data, timeout=30, headers=headers)
    return json.loads(msg.data), msg


async def test_execution_request_over_nats_in_the_seeds_shapes(
    goal_engine: Engine,
    nats_url: str,  # noqa: F811
    client: NatsClient,
) -> None:
    _, token = await create_key(goal_engine.store, "operator", "goal tests")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with NatsInterface(
        goal_engine, nats_url, prefix=prefix, stream=f"{prefix.upper()}_EVENTS"
    ) as interface:
        assert interface.execution_subject == "execution.request"
        request = {
            "task": "Create a NATS consumer for processing user events",
            "language": "elixir",
            "complexity": "medium",
            "context": {"workspace": "/srv/app", "target_file": "lib/user_events/consumer.ex"},
        }
        reply, msg = await ask(client, "execution.request", json.dumps(request).encode(), token, "cid-1")
        assert {"result", "template_used", "model_used", "method", "metrics"} <= set(reply)
        assert set(reply["metrics"]) == {
            "time_ms",
            "tokens_used",
            "cost_usd",
            "cache_hit",
            "quality",
            "success",
        }
        assert reply["metrics"]["success"] is True and reply["method"] == "llm" and "error" not in reply
        assert reply["correlation_id"] == "cid-1" and msg.headers["Correlation-Id"] == "cid-1"
        run = await goal_engine.store.get_run(reply["run_id"])
        prompts = " ".join(s["with"]["prompt"] for s in (run.plan or {})["steps"])
        assert "Target file: lib/user_events/consumer.ex" in prompts  # the context reaches the model
        assert "Workspace: /srv/app" in prompts
        for data, code in (
            (json.dumps({"language": "elixir"}).encode(), "invalid_request"),
            (b"{not json", "unreadable_body"),
            (json.dumps({"task": "Add tests", "language": "cobol"}).encode(), "invalid_request"),
        ):
            refused, msg = await ask(client, "execution.request", data, token, "cid-2")
            assert refused["error"] == code and refused["message"], refused
            assert refused["metrics"] == {"success": False} and refused["correlation_id"] == "cid-2"
            assert msg.headers["Error-Code"] == code
        anonymous = await client.request("execution.request", json.dumps(request).encode(), timeout=10)
        assert json.loads(anonymous.data)["error"] == "unauthenticated"
