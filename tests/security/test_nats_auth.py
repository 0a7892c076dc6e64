"""NATS callers need a key: without one (or with a revoked one, or one of too low a role)
a request is answered with an error and a denied audit entry, and changes nothing; with one,
it acts as that key, with its role's powers. Against the real nats-server."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from baton import Engine
from baton.api.auth import create_key
from baton.api.nats import NatsInterface, connect_options
from baton.errors import UsageError
from tests.test_nats import Names, ask, error_code, names, nats_url

__all__ = ["names", "nats_url"]  # fixtures

PLAN = {"plan": {"name": "n", "steps": [{"id": "a", "task": "echo"}]}}


async def test_anonymous_revoked_and_underprivileged_requests_are_refused(
    tmp_path: Path, nats_url: str, names: Names
) -> None:
    async with Engine(str(tmp_path / "baton.db"), poll_s=0.05, workdir=tmp_path) as engine:
        await engine.start_worker()
        operator, op_token = await create_key(engine.store, "operator")
        viewer, view_token = await create_key(engine.store, "viewer")
        revoked, old_token = await create_key(engine.store, "operator")
        await engine.store.revoke_api_key(revoked.id, 0.0)
        async with NatsInterface(engine, nats_url, prefix=names.prefix, stream=names.stream) as interface:
            p = interface.prefix
            nc = await nats.connect(nats_url)
            try:
                anonymous, msg = await ask(nc, f"{p}.runs.start", PLAN)
                assert error_code(anonymous, msg) == "unauthenticated"
                garbage, _ = await ask(nc, f"{p}.execute", {"task": "echo"}, {"Authorization": "Bearer nope"})
                assert error_code(garbage) == "unauthenticated"
                stale, _ = await ask(nc, f"{p}.runs.start", PLAN, {"Authorization": f"Bearer {old_token}"})
                assert error_code(stale) == "unauthenticated"
                low, _ = await ask(nc, f"{p}.runs.start", PLAN, {"Authorization": f"Bearer {view_token}"})
                assert error_code(low) == "forbidden"
                assert await engine.store.list_runs() == []  # none of them started anything

                started, _ = await ask(nc, f"{p}.runs.start", PLAN, {"Authorization": f"Bearer {op_token}"})
                run_id = started["id"]
                read, _ = await ask(
                    nc, f"{p}.runs.get", {"id": run_id}, {"Authorization": f"Bearer {view_token}"}
                )
                assert read["id"] == run_id  # a viewer reads
                cancel, _ = await ask(nc, f"{p}.runs.cancel", {"id": run_id})
                assert error_code(cancel) == "unauthenticated"
            finally:
                await nc.close()
        trail = await engine.store.audit_entries()
        # one entry per actor, reason and subject, a burst after it counted (written at stop)
        denied = [(e.actor, e.subject, e.detail.get("repeated", 1)) for e in trail if e.action == "denied"]
        assert denied == [
            ("unauthenticated", f"{p}.runs.start", 1),
            ("unauthenticated", f"{p}.execute", 1),
            ("unauthenticated", f"{p}.runs.start", 1),
            (f"key:{viewer.id}", f"{p}.runs.start", 1),
            ("unauthenticated", f"{p}.runs.cancel", 1),
        ]
        assert (f"key:{operator.id}", "run.start") in [(e.actor, e.action) for e in trail]


def test_connection_credentials_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no file at"):
        connect_options(creds=str(tmp_path / "missing.creds"))
    seed = tmp_path / "seed.nk"
    seed.write_text("SUAM...")
    assert connect_options(nkey_seed=str(seed)) == {"nkeys_seed": str(seed)}


async def test_a_burst_of_anonymous_requests_is_one_counted_entry(
    tmp_path: Path, nats_url: str, names: Names
) -> None:
    async with Engine(str(tmp_path / "baton.db"), poll_s=0.05, workdir=tmp_path) as engine:
        async with NatsInterface(engine, nats_url, prefix=names.prefix, stream=names.stream) as interface:
            nc = await nats.connect(nats_url)
            try:
                for _ in range(30):
                    reply, _ = await ask(nc, f"{interface.prefix}.execute", {"task": "echo"})
                    assert error_code(reply) == "unauthenticated"
            finally:
                await nc.close()
        denied = [e for e in await engine.store.audit_entries() if e.action == "denied"]
    assert [e.detail.get("repeated") for e in denied] == [None, 29]
