"""The audit trail: who did what to which run or key, and how runs ended.

Entries are appended to the store (``audit_append``), each chained to the one before by
the SHA-256 of its content and the previous hash, so editing or removing one breaks the
chain from there on: ``baton audit verify`` says where. What is recorded:

- control actions, with who did them: a run started, paused, resumed, cancelled; a job
  enqueued or cancelled; a key made or revoked (``key:<id>`` through the API,
  ``cli:<user>@<host>`` from the command line);
- policy denials: a request without a valid key, or with a key whose role does not allow
  it (``denied``);
- state changes of runs: how each ended (``run.completed``, ``run.failed``,
  ``run.cancelled``), recorded by the process that saw it, from the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from baton.errors import BatonError
from baton.store import AuditEntry, Store
from baton.store.base import GENESIS, audit_hash

if TYPE_CHECKING:
    from baton.engine import Engine, Event

log = structlog.get_logger("baton.audit")

SYSTEM = "system"
ENDINGS = ("run.completed", "run.failed", "run.cancelled")
DRAIN_DELAY_S = 0.01
#: how many ended runs RunEndings remembers, so that an ending is written once
REMEMBERED = 10_000


def cli_actor() -> str:
    """Who runs this command, as the trail names them."""
    return f"cli:{_user_at_host()}"


def python_actor() -> str:
    """Who calls the Python API, when the caller does not say."""
    return f"python:{_user_at_host()}"


@functools.cache
def _user_at_host() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def record(store: Store, actor: str, action: str, subject: str, **detail: Any) -> AuditEntry | None:
    """Append an entry; a store that cannot take it is logged, never fatal to the action."""
    try:
        return await store.audit_append(time.time(), actor, action, subject, detail)
    except BatonError as exc:
        log.error("audit entry not written", actor=actor, action=action, subject=subject, error=exc.message)
        return None


class RunEndings:
    """Records how the runs this process sees end (from the event stream, run events only,
    so steps cost nothing extra)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        #: runs whose ending is on the trail already (a repeated cancel ends nothing new)
        self._recorded: OrderedDict[str, None] = OrderedDict()
        self._unsubscribe = engine.events.subscribe(self._on_event, prefix="run.")

    def _on_event(self, event: Event) -> None:
        if event.kind in ENDINGS and event.run_id not in self._recorded:
            self._recorded[event.run_id] = None
            if len(self._recorded) > REMEMBERED:
                self._recorded.popitem(last=False)
            self._queue.put_nowait(event)
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # Off the path of whatever ended the run (a reply waiting on it goes out first),
        # and the endings of a burst written in one go.
        await asyncio.sleep(DRAIN_DELAY_S)
        while not self._queue.empty():
            event = self._queue.get_nowait()
            detail = {k: v for k, v in event.data.items() if k == "error"}
            await record(self.engine.store, SYSTEM, event.kind, event.run_id, **detail)

    async def close(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    #: the first entry that does not chain (None when the chain holds)
    broken_at: int | None = None
    problem: str | None = None


async def verify(store: Store, page: int = 1000) -> Verification:
    """Check the whole chain: each entry's hash, and that it names the one before."""
    prev, count, after = GENESIS, 0, 0
    while True:
        entries = await store.audit_entries(after=after, limit=page)
        for e in entries:
            if e.prev_hash != prev:
                return Verification(False, count, e.seq, "it does not follow the entry before it")
            if audit_hash(e.prev_hash, e.ts, e.actor, e.action, e.subject, e.detail) != e.hash:
                return Verification(False, count, e.seq, "its content does not match its hash")
            prev, count, after = e.hash, count + 1, e.seq
        if len(entries) < page:
            return Verification(True, count)


__all__ = ["SYSTEM", "RunEndings", "Verification", "cli_actor", "python_actor", "record", "verify"]
