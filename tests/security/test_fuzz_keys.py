"""Schemathesis (coverage, fuzzing and stateful phases) against a real `baton serve` with a
garbage key and with a revoked one: every answer is on the OpenAPI document, never a 5xx.
(The runs without a key and with a valid one are in tests/test_api.py.)"""

from __future__ import annotations

import json
import secrets

from tests.test_api import Server, baton, schemathesis_run, server

__all__ = ["server"]  # the fixture


def test_schemathesis_with_a_garbage_key_finds_no_5xx(server: Server) -> None:
    garbage = f"baton_{secrets.token_hex(5)}_{secrets.token_urlsafe(32)}"
    for header in (f"Authorization: Bearer {garbage}", "Authorization: Basic bm8tc3VjaDprZXk="):
        done = schemathesis_run(server, header)
        assert done.returncode == 0, done.stdout[-4000:]
        assert " passed" in done.stdout


def test_schemathesis_with_a_revoked_key_finds_no_5xx(server: Server) -> None:
    made = json.loads(baton("keys", "create", "--role", "admin", "--db", str(server.db), "--json").stdout)
    revoked = baton("keys", "revoke", made["id"], "--db", str(server.db))
    assert revoked.returncode == 0, revoked.stderr
    assert server.client(token=made["token"]).get("/runs").status_code == 401
    done = schemathesis_run(server, f"Authorization: Bearer {made['token']}")
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout
