"""The in-memory store: runs that need not outlive the process (tests, throwaway calls).

It is the SQLite store on a private in-memory database, so it keeps exactly the rules,
queue semantics and migrations of the embedded default, with nothing written to disk.
"""

from __future__ import annotations

from baton.store.sqlite.store import SQLiteStore


class MemoryStore(SQLiteStore):
    """Store in this process's memory (``memory://``); gone when the store closes."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.url = "memory://"
        self.open_sync()  # nothing to connect to: usable at once

    async def close(self) -> None:
        """Nothing to close: the data lives as long as this object (engines may share it)."""
