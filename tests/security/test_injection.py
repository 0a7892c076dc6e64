"""The injection corpus: hostile text wherever a caller can put text (path and query
parameters, headers, plan names, step ids, inputs, references), against a real `baton
serve`. Each is refused with a 4xx naming the problem, or kept verbatim as data; none is
a 5xx, none is run as SQL, a template or a path, and the database keeps its tables, its
keys and its runs."""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.test_api import Server, keyed_server, wait_run

CORPUS = [
    "' OR '1'='1",
    "x'; DROP TABLE runs; --",
    '" OR ""="',
    "1; DELETE FROM api_keys",
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%00",
    "\\x00",
    "{{7*7}}",
    "${7*7}",
    "${{ steps.none.output }}",
    "$(id)",
    "`id`",
    "<script>alert(1)</script>",
    "\u202eevil",
    "a" * 5000,
    "😀" * 100,
    "%s%s%s%n",
    "\r\nX-Injected: 1",
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("injection") / "baton.db"
    with keyed_server(
        db, ("operator", "admin"), "--rate-limit", "none", "--rate-limit-address", "none"
    ) as server:
        yield server


def _state(api: Server) -> tuple[set[str], int, int]:
    with sqlite3.connect(api.db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        keys = int(con.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])
        runs = int(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    return tables, keys, runs


def _no_5xx(answer: httpx.Response, what: Any) -> None:
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert answer.json()["message"], (what, answer.text[:300])


def test_hostile_path_query_and_header_values_are_4xx_and_touch_nothing(api: Server) -> None:
    before = _state(api)
    client = api.client("admin")
    for text in CORPUS:
        quoted = urllib.parse.quote(text, safe="")
        for path in (
            f"/runs/{quoted}",
            f"/runs/{quoted}/steps/{quoted}",
            f"/jobs/{quoted}",
            f"/runs/{quoted}/cancel",
        ):
            method = client.post if path.endswith("cancel") else client.get
            answer = method(path)
            _no_5xx(answer, path)
            assert answer.status_code in (400, 404, 422), (path, answer.status_code)
        for params in ({"status": text}, {"limit": text}, {"offset": text}, {"run": text}):
            _no_5xx(client.get("/runs", params=params), params)
            _no_5xx(client.get("/audit", params=params), params)
            _no_5xx(client.get("/jobs", params={"state": text, "queue": text}), params)
        header_safe = text.replace("\r", "").replace("\n", "")
        if header_safe.isascii():
            _no_5xx(
                client.post(
                    "/runs", json={"name": "p", "steps": []}, headers={"Idempotency-Key": header_safe}
                ),
                text,
            )
            stranger = httpx.post(
                f"{api.url}/api/v1/runs", headers={"Authorization": f"Bearer {header_safe}"}, json={}
            )
            assert stranger.status_code == 401, (text, stranger.status_code)
    assert _state(api) == before


def test_hostile_plans_are_refused_or_kept_verbatim(api: Server) -> None:
    client = api.client("operator")
    tables, keys, _ = _state(api)
    for text in CORPUS:
        refused = client.post("/runs", json={"name": "p", "steps": [{"id": text, "task": "echo"}]})
        assert refused.status_code == 422, (text, refused.status_code)  # step ids are names
        also = client.post("/runs", json={"name": "p", "steps": [{"id": "a", "task": text}]})
        assert also.status_code in (400, 422), (text, also.status_code)
    # as data, in a name and in inputs: stored and echoed back as written
    values = [t for t in CORPUS if "${{" not in t]
    plan = {
        "name": values[1],
        "steps": [{"id": f"s{i}", "task": "echo", "with": {"value": v}} for i, v in enumerate(values)],
    }
    made = client.post("/runs", json=plan)
    assert made.status_code == 202, made.text
    detail = wait_run(client, made.json()["id"])
    assert detail["status"] == "completed" and detail["name"] == values[1]
    outputs = {s["id"]: s["output"] for s in detail["steps"]}
    assert [outputs[f"s{i}"]["value"] for i in range(len(values))] == values
    # a reference to a step that is not there is a plan error, not a lookup
    bad_ref = {"name": "r", "steps": [{"id": "a", "task": "echo", "with": {"x": "${{ steps.none.output }}"}}]}
    answer = client.post("/runs", json=bad_ref)
    assert answer.status_code == 422 and "none" in answer.text
    assert _state(api)[:2] == (tables, keys)
    with sqlite3.connect(api.db) as con:
        assert con.execute("SELECT COUNT(*) FROM runs WHERE name = ?", (values[1],)).fetchone()[0] == 1
