"""A server without keys answers only this machine's own clients: what a web page in the
machine's browser could send (a text/plain POST, a foreign Origin, a rebound Host) is
refused before it reaches the API, against a real `baton serve --no-auth`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_api import start, stop

PLAN = json.dumps({"name": "drive-by", "steps": [{"id": "a", "task": "echo"}]})


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    db = tmp_path_factory.mktemp("local") / "baton.db"
    proc, url = start(db, "--no-auth", "--allowed-host", "baton.internal")
    try:
        yield url, db
    finally:
        stop(proc)


def _runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "text/plain"}, 415),  # a "simple" cross-origin POST needs no preflight
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "application/json", "Host": "evil.example"}, 421),  # DNS rebinding
    ],
)
def test_what_a_foreign_page_could_send_is_refused(
    local: tuple[str, Path], headers: dict[str, str], status: int
) -> None:
    url, db = local
    before = _runs(db)
    refused = httpx.post(f"{url}/api/v1/runs", content=PLAN, headers=headers, timeout=10)
    assert refused.status_code == status, refused.text
    assert refused.json()["message"]
    assert _runs(db) == before


def test_the_machines_own_clients_and_named_hosts_are_answered(local: tuple[str, Path]) -> None:
    url, _ = local
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"baton.internal:{port}"):
        made = httpx.post(
            f"{url}/api/v1/runs",
            content=PLAN,
            headers={"Content-Type": "application/json", "Host": host},
            timeout=10,
        )
        assert made.status_code == 202, (host, made.text)
    same_origin = {"Content-Type": "application/yaml", "Origin": url}
    assert httpx.post(f"{url}/api/v1/runs", content=PLAN, headers=same_origin, timeout=10).status_code == 202
    assert httpx.get(f"{url}/api/v1/runs", timeout=10).status_code == 200
