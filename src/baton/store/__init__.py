"""The store seam: the protocol, and the backends behind it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from baton.errors import UsageError
from baton.store.base import (
    AttemptRecord,
    Batch,
    Claim,
    CommitResult,
    Finish,
    Mark,
    RunRecord,
    StepRecord,
    Store,
)
from baton.store.memory import MemoryStore
from baton.store.sqlite import SQLiteStore

DEFAULT_DB = ".baton/baton.db"


def store_for(url: str | None) -> Store:
    """The store a URL names: ``memory://``, ``sqlite:///path``, or a plain file path.

    SQLite commits survive the death of the process by default (WAL, synchronous=normal);
    ``?synchronous=full`` also makes them survive an OS crash or power loss, at the price
    of an fsync per commit.
    """
    url = url or DEFAULT_DB
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
        raise UsageError(f"unsupported database URL scheme {scheme!r} (use sqlite:///path or memory://)")
    return SQLiteStore(Path(url), synchronous=synchronous)


__all__ = [
    "DEFAULT_DB",
    "AttemptRecord",
    "Batch",
    "Claim",
    "CommitResult",
    "Finish",
    "Mark",
    "MemoryStore",
    "RunRecord",
    "SQLiteStore",
    "StepRecord",
    "Store",
    "store_for",
]
