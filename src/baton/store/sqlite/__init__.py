"""The SQLite store."""

from baton.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
