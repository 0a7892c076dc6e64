"""A trail that can't be quietly rewritten: the audit chain is keyed (HMAC-SHA256, the key
outside the database), a signed head shows entries removed since it was taken, and the
database and the key are only their owner's to read. Real SQLite files, the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from baton import Engine
from baton.audit import KEYED, verify
from baton.metrics import Metrics
from baton.store import SQLiteStore
from baton.store.base import GENESIS
from tests.test_api import baton

PLAN = {"name": "p", "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}]}


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """A database whose trail holds a few runs' starts and ends (its key beside it)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    db = tmp_path / "baton.db"
    for _ in range(3):
        done = baton("run", str(plan), "--db", str(db), "--quiet")
        assert done.returncode == 0, done.stderr
    return db


def verified(db: Path, *extra: str) -> tuple[int, dict[str, object]]:
    done = baton("audit", "verify", "--db", str(db), "--json", *extra)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def plain_rechain(db: Path) -> None:
    """What someone with the database but not the key can do: recompute every hash."""
    with sqlite3.connect(db) as con:
        prev = GENESIS
        for seq, ts, actor, action, subject, detail in con.execute(
            "SELECT seq, ts, actor, action, subject, detail FROM audit ORDER BY seq"
        ).fetchall():
            canonical = json.dumps(
                [prev, f"{ts:.6f}", actor, action, subject, json.loads(detail)],
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            )
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            con.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
            prev = digest


def test_the_database_and_its_key_are_their_owners_alone(trail: Path) -> None:
    key = trail.parent / "audit.key"
    for file in (trail, key):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    code, result = verified(trail)
    assert code == 0 and result["ok"] is True and result["keyed"] is True and result["entries"] == 6


def test_a_rewrite_by_someone_without_the_key_is_detected(trail: Path) -> None:
    with sqlite3.connect(trail) as con:
        con.execute("DELETE FROM audit WHERE seq = 3")
    plain_rechain(trail)  # a consistent chain again, by SHA-256
    code, result = verified(trail)
    assert code == 1 and result["ok"] is False and "none of its 5 entries is keyed" in str(result["problem"])
    # and one entry changed, without recomputing: broken right there
    with sqlite3.connect(trail) as con:
        con.execute("UPDATE audit SET actor = 'someone else' WHERE seq = 2")
    code, result = verified(trail)
    assert code == 1 and result["broken_at"] == 2


def test_a_changed_entry_breaks_the_chain_where_it_is(trail: Path) -> None:
    with sqlite3.connect(trail) as con:
        con.execute("UPDATE audit SET actor = 'someone else' WHERE seq = 4")
    code, result = verified(trail)
    assert code == 1 and result["broken_at"] == 4 and result["entries"] == 3


def test_removing_the_newest_entries_shows_against_a_head(trail: Path, tmp_path: Path) -> None:
    taken = baton("audit", "head", "--db", str(trail))
    assert taken.returncode == 0, taken.stderr
    head = tmp_path / "head.json"
    head.write_text(taken.stdout)
    assert json.loads(taken.stdout)["entries"] == 6
    assert verified(trail, "--head", str(head))[0] == 0
    # more entries since: still fine
    more = baton("run", str(tmp_path / "plan.json"), "--db", str(trail), "--quiet")
    assert more.returncode == 0
    code, result = verified(trail, "--head", str(head))
    assert code == 0 and result["entries"] == 8 and result["head_checked"] is True
    # the newest three removed: the chain alone verifies, the head does not
    with sqlite3.connect(trail) as con:
        con.execute("DELETE FROM audit WHERE seq > 5")
    assert verified(trail)[0] == 0
    code, result = verified(trail, "--head", str(head))
    assert code == 1 and "fewer than the head's 6" in str(result["problem"])
    # all of them removed
    with sqlite3.connect(trail) as con:
        con.execute("DELETE FROM audit")
    code, result = verified(trail, "--head", taken.stdout)
    assert code == 1 and result["entries"] == 0


def test_the_head_entry_rewritten_and_a_forged_head_are_refused(trail: Path, tmp_path: Path) -> None:
    taken = json.loads(baton("audit", "head", "--db", str(trail)).stdout)
    with sqlite3.connect(trail) as con:
        con.execute("DELETE FROM audit WHERE seq = 6")
    more = baton("run", str(tmp_path / "plan.json"), "--db", str(trail), "--quiet")
    assert more.returncode == 0  # 7 entries again, but not the head's sixth
    code, result = verified(trail, "--head", json.dumps(taken))
    assert code == 1 and "cut or rewritten" in str(result["problem"])
    forged = {**taken, "entries": 1}
    refused = baton("audit", "verify", "--db", str(trail), "--head", json.dumps(forged))
    assert refused.returncode == 2 and "signature does not match" in refused.stderr
    garbage = baton("audit", "verify", "--db", str(trail), "--head", "{not json")
    assert garbage.returncode == 2 and "not JSON" in garbage.stderr


def test_a_key_others_may_read_or_a_short_one_is_refused(trail: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_text("k" * 40)
    loose.chmod(0o644)
    refused = baton("audit", "verify", "--db", str(trail), "--audit-key", str(loose))
    assert refused.returncode == 2 and "may be read by others" in refused.stderr
    short = baton("audit", "verify", "--db", str(trail), env={"BATON_AUDIT_KEY": "short", "PATH": "/usr/bin"})
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    # another key: the trail was not written under it
    other = tmp_path / "other.key"
    other.write_text("x" * 64)
    other.chmod(0o600)
    done = baton("audit", "verify", "--db", str(trail), "--audit-key", str(other), "--json")
    assert done.returncode == 1 and "another key" in json.loads(done.stdout)["problem"]


async def test_a_trail_from_before_keys_takes_its_key_once(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old = SQLiteStore(db)  # as an earlier version wrote it: no key
    await old.open()
    for i in range(3):
        await old.audit_append(1.0e9 + i, "cli:me@host", "run.start", f"r{i}", {})
    await old.close()
    async with Engine(str(db)) as engine:  # the key is made: the trail adopts it
        result = await verify(engine.store, engine.store.audit_key)
        entries = await engine.store.audit_entries()
    assert result.ok and result.unkeyed == 3 and entries[-1].action == KEYED
    # once the key exists, a trail rewritten without it is not adopted again
    plain_rechain(db)
    async with Engine(str(db)) as engine:
        again = await verify(engine.store, engine.store.audit_key)
    assert not again.ok


async def test_the_metrics_publish_the_trails_length(trail: Path) -> None:
    async with Engine(str(trail)) as engine:
        metrics = Metrics(engine)
        await metrics.refresh(engine.store, 0.0)
        text = metrics.render().decode()
        metrics.close()
    assert "baton_audit_entries 6.0" in text and "baton_audit_last_seq 6.0" in text


def test_a_head_needs_a_key(tmp_path: Path) -> None:
    async def make() -> None:
        store = SQLiteStore(tmp_path / "x.db")
        await store.open()
        await store.close()

    asyncio.run(make())
    # a key file of its own is made beside it: a head can be signed
    assert baton("audit", "head", "--db", str(tmp_path / "x.db")).returncode == 0


def test_a_database_others_could_read_becomes_its_owners_alone(trail: Path) -> None:
    trail.chmod(0o644)  # as an earlier version left it
    assert baton("audit", "verify", "--db", str(trail)).returncode == 0
    assert stat.S_IMODE(trail.stat().st_mode) == 0o600
