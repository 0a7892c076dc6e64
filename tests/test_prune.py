"""Retention: `baton prune` on a real SQLite file, Engine.prune on every backend, and a worker
with a retention.

What "old" means is set by timestamps, never by waiting: the store suite's history ended
around T0 (January 1970), so anything older than a few days in real time is older than it;
what ends "now" is recent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from baton import Engine, audit
from baton.engine.engine import RETENTION_EVERY_S
from baton.errors import UsageError
from baton.status import RunStatus
from baton.store import NewJob, SQLiteStore
from tests.conftest import StoreFactory
from tests.test_store import CUT, HISTORY_PRUNED, T0, _complete, _history, failed, new_run, ok, worker

R = RunStatus
TIMEOUT_S = 60
DAY = 86400.0
#: a run of this many steps, each with an output this large: about 2 MB to give back
BIG_STEPS, BIG_OUTPUT = 100, 20_000


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _cmd(args: tuple[str | Path, ...]) -> list[str]:
    return [sys.executable, "-m", "baton", *map(str, args)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATON_DB", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "120"
    return env


def baton(*args: str | Path) -> Result:
    done = subprocess.run(
        _cmd(args), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


def baton_all(*commands: tuple[str | Path, ...]) -> list[Result]:
    """Commands that race nothing, at once; their results in order."""
    procs = [
        subprocess.Popen(_cmd(c), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT_S)
        results.append(Result(p.returncode, out, err))
    return results


def _digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


async def _database(db: Path) -> dict[str, int]:
    """An SQLite file with runs and jobs that ended in 1970 (a large completed run among
    them), runs under way made then (paused, running), a run and a job that ended now, an
    audit trail. The job ids by name."""
    store = SQLiteStore(db)
    store.audit_key = audit.load_key(beside=db.parent)  # as an engine on it writes the trail
    await store.open()
    try:
        now = time.time()
        w = await worker(store, lease_s=1e10)  # (the running run stays held)
        big = await new_run(store, "old-big", {f"s{i}": [] for i in range(BIG_STEPS)})
        while claims := await w.claim(T0 + 1):
            await w.finish(*(ok(c, T0 + 1, big, output="x" * BIG_OUTPUT) for c in claims))
        broken = await new_run(store, "old-failed", {"a": []})
        (a,) = await w.claim(T0 + 2)
        await w.finish(failed(a, T0 + 2, broken))
        await new_run(store, "old-cancelled")
        await store.set_run_status("old-cancelled", R.CANCELLED, T0 + 3)
        await _complete(w, await new_run(store, "recent", {"a": []}), now)
        done, discarded, fresh, later = await store.enqueue(
            [
                NewJob("echo", {"job": "done"}),
                NewJob("echo", {"job": "discarded"}, max_attempts=1),
                NewJob("echo", {"job": "fresh"}),
                NewJob("echo", {"job": "later"}, run_at=now + 365 * DAY),
            ],
            T0,
        )
        claims = {c.id: c for c in await w.claim(T0 + 4)}
        await w.finish(
            ok(claims[done.id], T0 + 5), failed(claims[discarded.id], T0 + 5), ok(claims[fresh.id], now)
        )
        await new_run(store, "old-paused")
        await store.set_run_status("old-paused", R.PAUSED, T0 + 6)
        await new_run(store, "old-running")
        assert len(await w.claim(T0 + 7)) == 1
        await audit.record(store, "cli:me@host", "run.cancel", "old-cancelled")
        await audit.record(store, audit.SYSTEM, "run.completed", "old-big")
        return {"done": done.id, "discarded": discarded.id, "fresh": fresh.id, "later": later.id}
    finally:
        await store.close()


async def _left(db: Path) -> tuple[list[str], list[int]]:
    """The run ids and job ids left in the file."""
    store = SQLiteStore(db)
    await store.open()
    try:
        runs = sorted(r.id for r in await store.list_runs())
        return runs, sorted(j.id for j in await store.list_jobs())
    finally:
        await store.close()


KEPT_RUNS = ["old-paused", "old-running", "recent"]
#: of `_database`: three old runs (100 + 1 + 3 steps), the completed and the discarded job,
#: the attempts on record (old-failed's, the discarded job's)
PRUNED = {"runs": 3, "steps": 104, "jobs": 2, "attempts": 2, "cache": 0}


def _counts(doc: dict[str, Any]) -> dict[str, int]:
    return {k: doc[k] for k in PRUNED}


# -- the command -------------------------------------------------------------------------


async def test_prune_removes_what_ended_long_ago_keeps_the_trail_verifiable_and_shrinks_the_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "baton.db"
    ids = await _database(db)
    before_runs, before_jobs = await _left(db)
    assert len(before_runs) == 6

    # a dry run counts, deletes nothing, leaves the file as it was
    digest = _digest(db)
    dry = baton("prune", "--older-than", "30d", "--db", db, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    doc = dry.json()
    assert _counts(doc) == PRUNED
    assert doc["dry_run"] is True and doc["bytes"] >= BIG_STEPS * BIG_OUTPUT
    assert doc["file_bytes_before"] is None
    assert doc["statuses"] == ["completed", "failed", "cancelled"]
    assert await _left(db) == (before_runs, before_jobs)
    text = baton("prune", "--older-than", "30d", "--db", db, "--dry-run")
    assert text.code == 0, text.err
    assert "would prune" in text.out and "nothing was deleted" in text.out
    assert _digest(db) == digest

    size = db.stat().st_size
    assert size > BIG_STEPS * BIG_OUTPUT
    result = baton("prune", "--older-than", "30d", "--db", db, "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert _counts(doc) == PRUNED and doc["dry_run"] is False
    assert doc["file_bytes_before"] == size
    assert doc["file_bytes_after"] == db.stat().st_size < size - BIG_STEPS * BIG_OUTPUT * 0.8
    assert await _left(db) == (KEPT_RUNS, sorted([ids["fresh"], ids["later"]]))

    # the trail is whole and says who pruned what
    verified = baton("audit", "verify", "--db", db, "--json")
    assert verified.code == 0, verified.out
    assert verified.json()["ok"] is True and verified.json()["entries"] == 3
    entries = baton("audit", "list", "--db", db, "--json").json()
    assert [e["action"] for e in entries] == ["run.cancel", "run.completed", "prune"]
    entry = entries[-1]
    assert entry["actor"].startswith("cli:")
    assert {k: entry["detail"][k] for k in PRUNED} == PRUNED
    assert entry["detail"]["before"] == doc["before"]
    assert entry["detail"]["statuses"] == ["cancelled", "completed", "failed"]

    # nothing left to prune: said so, and no entry for it
    again = baton("prune", "--older-than", "30d", "--db", db)
    assert again.code == 0, again.err
    assert "nothing to prune" in again.out
    assert len(baton("audit", "list", "--db", db, "--json").json()) == 3


async def test_prune_removes_only_the_statuses_asked(tmp_path: Path) -> None:
    db = tmp_path / "baton.db"
    ids = await _database(db)
    failed_only = baton("prune", "--older-than", "3600s", "--status", "failed", "--db", db, "--json")
    assert failed_only.code == 0, failed_only.err
    assert (failed_only.json()["runs"], failed_only.json()["jobs"]) == (1, 1)
    runs, jobs = await _left(db)
    assert "old-failed" not in runs and "old-big" in runs and ids["discarded"] not in jobs

    # the other ends, by a shorter age (runs under way stay, whatever their age)
    rest = baton("prune", "--older-than", "12h", "--status", "completed,cancelled", "--db", db, "--json")
    assert rest.code == 0, rest.err
    assert (rest.json()["runs"], rest.json()["jobs"]) == (2, 1)  # old-big, old-cancelled; done
    assert await _left(db) == (KEPT_RUNS, sorted([ids["fresh"], ids["later"]]))


async def test_a_bad_age_or_status_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "baton.db"
    await _database(db)
    digest = _digest(db)
    bad = [
        ("--older-than", "30"),
        ("--older-than", "thirty days"),
        ("--older-than", "0d"),
        ("--older-than", "-5d"),
        ("--older-than", "30y"),
        ("--older-than", "30d", "--status", "running"),
        ("--older-than", "30d", "--status", "completed,paused"),
        ("--older-than", "30d", "--status", "bogus"),
        ("--older-than", "30d", "--status", ","),
    ]
    results = baton_all(*(("prune", *args, "--db", db, "--json") for args in bad))
    for args, result in zip(bad, results, strict=True):
        assert result.code == 2, (args, result.out, result.err)
        error = result.json()["error"]
        assert error["code"] == "usage", (args, error)
        assert ("--status" if "--status" in args else "duration") in error["message"]
    assert "never pruned" in results[5].json()["error"]["message"]
    assert "30y" in results[4].err
    retention = baton("worker", "--retention", "a month", "--db", db, "--json")
    assert retention.code == 2 and "--retention 'a month' is not a duration" in retention.err
    assert _digest(db) == digest

    missing = baton("prune", "--older-than", "30d", "--db", tmp_path / "none.db")
    assert missing.code == 2 and "no database" in missing.err
    assert not (tmp_path / "none.db").exists()


# -- the engine, on every backend ---------------------------------------------------------


async def test_engine_prune_is_an_audit_entry_and_the_trail_still_verifies(stores: StoreFactory) -> None:
    store = stores()
    async with Engine(store) as engine:
        await _history(store)
        assert (await audit.verify(store)).entries == 2

        dry = await engine.prune(CUT, dry_run=True, actor="cli:me@host")
        assert {k: v for k, v in dry.counts().items() if k != "bytes"} == HISTORY_PRUNED
        assert (await audit.verify(store)).entries == 2  # a dry run is not on the trail

        # two batches at most: what went so far is on the trail, and more is left
        partial = await engine.prune(CUT, batch=2, max_batches=2, actor="cli:me@host")
        assert partial.more and 0 < partial.runs < HISTORY_PRUNED["runs"]
        rest = await engine.prune(CUT, batch=2, actor="cli:me@host")
        assert not rest.more
        assert partial.runs + rest.runs == HISTORY_PRUNED["runs"]
        assert partial.jobs + rest.jobs == HISTORY_PRUNED["jobs"]
        assert partial.bytes + rest.bytes == dry.bytes
        assert (await engine.prune(CUT, actor="cli:me@host")).removed == 0

        verified = await audit.verify(store)
        assert verified.ok and verified.entries == 4  # one entry per prune that removed something
        entries = await store.audit_entries()
        first, second = entries[-2:]
        assert (first.action, first.actor, first.subject) == ("prune", "cli:me@host", "history")
        assert first.detail["runs"] == partial.runs and second.detail["runs"] == rest.runs
        assert first.detail["before"] == "1970-01-12T14:03:20+00:00"
        assert first.detail["statuses"] == ["cancelled", "completed", "failed"]

        with pytest.raises(UsageError):
            await engine.prune(CUT, [R.RUNNING])
        with pytest.raises(UsageError):
            await engine.prune(CUT, batch=0)


async def test_retention_applies_when_due_and_not_more_often(stores: StoreFactory) -> None:
    store = stores()
    with pytest.raises(UsageError):
        Engine(store, retention_s=0)
    async with Engine(store) as keeper:
        assert await keeper.apply_retention(T0) is None  # no retention: keeps everything
    async with Engine(store, retention_s=3600.0) as engine:
        await _history(store)
        now = CUT + 3600.0  # what ended before CUT is more than an hour old
        first = await engine.apply_retention(now)
        assert first is not None and first.runs == HISTORY_PRUNED["runs"]
        assert await engine.apply_retention(now + 1) is None  # not due yet
        later = await engine.apply_retention(now + RETENTION_EVERY_S)
        assert later is not None and later.removed == 0
        (entry,) = [e for e in await store.audit_entries() if e.action == "prune"]
        assert entry.actor == audit.SYSTEM  # no worker in this engine
        assert (await audit.verify(store)).ok


async def test_a_worker_with_a_retention_prunes_what_ended_long_ago(tmp_path: Path) -> None:
    db = tmp_path / "baton.db"
    store = SQLiteStore(db)
    await store.open()
    w = await worker(store, lease_s=1e10)
    for run_id in ("old1", "old2"):
        await _complete(w, await new_run(store, run_id), T0 + 1)
    await store.enqueue([NewJob("echo", {})], T0)
    await w.finish(*(ok(c, T0 + 2) for c in await w.claim(T0 + 2)))
    await new_run(store, "paused")
    await store.set_run_status("paused", R.PAUSED, T0 + 3)
    await store.unregister_worker("w1", T0 + 3)
    await store.close()

    engine = Engine(f"sqlite:///{db}", retention_s=30 * DAY, poll_s=0.05)
    async with engine:
        running = await engine.start_worker(name="keeper")
        deadline = time.monotonic() + TIMEOUT_S
        while [r.id for r in await engine.store.list_runs()] != ["paused"]:
            assert time.monotonic() < deadline, "the worker never pruned"
            await asyncio.sleep(0.05)
        assert await engine.store.list_jobs() == []
        assert running.active
        assert (await engine.store.get_run("paused")).status is R.PAUSED
        entries = [e for e in await engine.store.audit_entries() if e.action == "prune"]
        assert [(e.actor, e.detail["runs"], e.detail["jobs"]) for e in entries] == [("worker:keeper", 2, 1)]
        assert (await audit.verify(engine.store)).ok
