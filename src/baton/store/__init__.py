"""The store seam: the protocol, and the backends behind it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from baton.errors import UsageError
from baton.store.base import (
    ApiKey,
    AttemptRecord,
    AuditEntry,
    Beat,
    BudgetClaim,
    BudgetSettle,
    Claimed,
    Done,
    GoalRecord,
    JobRecord,
    LedgerEntry,
    NewJob,
    OutcomeRecord,
    RunRecord,
    Schedule,
    StepRecord,
    Store,
    Turn,
    TurnResult,
    WorkerRecord,
)
from baton.store.memory import MemoryStore
from baton.store.sqlite import SQLiteStore

DEFAULT_DB = ".baton/baton.db"


def store_for(url: str | None, *, pool: int | None = None) -> Store:
    """The store a URL names: ``memory://``, ``sqlite:///path``, ``postgresql://...``, or a
    plain file path.

    SQLite commits survive the death of the process by default (WAL, synchronous=normal);
    ``?synchronous=full`` also makes them survive an OS crash or power loss, at the price
    of an fsync per commit. ``pool`` (PostgreSQL only) overrides the URL's ``pool=N``.
    """
    url = url or DEFAULT_DB
    if url.startswith(("postgresql://", "postgres://")):
        return _postgres(url, pool)
    if pool is not None:
        raise UsageError(f"a connection pool size applies to PostgreSQL only, not to {url!r}")
    if url.startswith("memory:"):
        return MemoryStore()
    url, _, query = url.partition("?")
    options = dict(parse_qsl(query))
    synchronous = options.pop("synchronous", "normal").upper()
    if options or synchronous not in ("NORMAL", "FULL"):
        raise UsageError(
            f"unsupported database URL option(s) {query!r}: the one option is synchronous=normal|full"
        )
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        return SQLiteStore(url.removeprefix("sqlite:///"), synchronous=synchronous)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise UsageError(
            f"unsupported database URL scheme {scheme!r} (use sqlite:///path, postgresql://... or memory://)"
        )
    return SQLiteStore(Path(url), synchronous=synchronous)


def _postgres(url: str, pool: int | None) -> Store:
    """``postgresql://...[?schema=NAME&pool=N&...]``: ``schema`` and ``pool`` (connections
    at most, in this process) are baton's; the rest goes to libpq."""
    from baton.store.postgres.store import DEFAULT_POOL_SIZE, PostgresStore

    base, _, query = url.partition("?")
    options = parse_qsl(query, keep_blank_values=True)
    schema = next((v for k, v in options if k == "schema"), None)
    in_url = next((_pool_size(v) for k, v in options if k == "pool"), None)  # checked even if overridden
    rest = urlencode([(k, v) for k, v in options if k not in ("schema", "pool")])
    size = pool if pool is not None else in_url or DEFAULT_POOL_SIZE
    return PostgresStore(f"{base}?{rest}" if rest else base, schema=schema, pool_size=size)


def _pool_size(text: str) -> int:
    """The URL's ``pool=N``: a whole number of connections, at least 1."""
    size = int(text) if text.isascii() and text.isdigit() else 0
    if size < 1:
        raise UsageError(
            f"database URL option pool={text!r}: the pool size must be a whole number, at least 1"
        )
    return size


__all__ = [
    "DEFAULT_DB",
    "ApiKey",
    "AttemptRecord",
    "AuditEntry",
    "Beat",
    "BudgetClaim",
    "BudgetSettle",
    "Claimed",
    "Done",
    "GoalRecord",
    "JobRecord",
    "LedgerEntry",
    "MemoryStore",
    "NewJob",
    "OutcomeRecord",
    "RunRecord",
    "SQLiteStore",
    "Schedule",
    "StepRecord",
    "Store",
    "Turn",
    "TurnResult",
    "WorkerRecord",
    "store_for",
]
