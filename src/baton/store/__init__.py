"""The store seam: the protocol, and the backends behind it."""

from __future__ import annotations

from pathlib import Path

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
    """The store a URL names: ``memory://``, ``sqlite:///path``, or a plain file path."""
    url = url or DEFAULT_DB
    if url.startswith("memory:"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise UsageError(f"unsupported database URL scheme {scheme!r} (use sqlite:///path or memory://)")
    return SQLiteStore(Path(url))


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
