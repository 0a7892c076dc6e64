"""Rate limits and denials that cannot grow the database, against a real `baton serve`
with small limits: past them a 429 with Retry-After, and a burst of denials is one audit
entry with a count, not one entry each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_api import Server, baton, start, stop


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Server]:
    db = tmp_path / "baton.db"
    made = baton("keys", "create", "--role", "operator", "--db", str(db), "--json")
    token = json.loads(made.stdout)["token"]
    proc, url = start(db, "--rate-limit", "5/minute", "--rate-limit-address", "3/minute")
    server = Server(url, {"operator": token}, db)
    try:
        yield server
    finally:
        server.close_clients()
        stop(proc)


def test_guessing_keys_is_turned_away_and_makes_few_audit_entries(
    limited: Server,
) -> None:
    server = limited
    codes = []
    for n in range(40):
        answer = httpx.get(
            f"{server.url}/api/v1/runs", headers={"Authorization": f"Bearer baton_x_{n}"}, timeout=10
        )
        codes.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["code"] == "rate_limited"
    assert codes[:3] == [401, 401, 401]
    assert set(codes[3:]) == {429}
    # A good key from the same address is not held back by the guessing.
    assert server.client("operator").get("/runs").status_code == 200
    entries = json.loads(baton("audit", "list", "--db", str(server.db), "--json").stdout)
    denied = [e for e in entries if e["action"] == "denied"]
    assert len(denied) == 2  # the first 401 and the first 429; the rest are being counted


def test_a_key_past_its_rate_gets_429(limited: Server) -> None:
    server = limited
    client = server.client("operator")
    codes = [client.get("/runs").status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}


def test_the_counts_of_a_burst_are_written_when_the_server_stops(tmp_path: Path) -> None:
    db = tmp_path / "baton.db"
    proc, url = start(db, "--rate-limit-address", "2/minute")
    try:
        for n in range(25):
            httpx.get(f"{url}/api/v1/runs", headers={"Authorization": f"Bearer baton_y_{n}"}, timeout=10)
    finally:
        stop(proc)
    entries = json.loads(baton("audit", "list", "--db", str(db), "--json").stdout)
    denied = [e for e in entries if e["action"] == "denied"]
    first = sum(1 for e in denied if "repeated" not in e["detail"])
    repeated = sum(int(e["detail"].get("repeated", 0)) for e in denied)
    assert len(denied) <= 4
    assert first + repeated == 25  # every denial is on the trail, counted
    assert baton("audit", "verify", "--db", str(db)).returncode == 0
