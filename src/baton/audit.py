"""The audit trail: who did what to which run or key, and how runs ended.

Entries are appended to the store (``audit_append``), each chained to the one before by an
HMAC-SHA256 of its content and the previous hash, under a key kept outside the database
(:func:`load_key`: ``BATON_AUDIT_KEY``, or a 0600 key file, by default ``audit.key``
beside a SQLite database, made on first use). Editing or removing an entry breaks the
chain from there on, and without the key no one can write a chain that verifies:
``baton audit verify`` says where it breaks. Removing the newest entries (or all of them)
leaves a chain that verifies: a *head* (``baton audit head``: the entry count and the last
hash, signed with the key), kept elsewhere, is what shows it (``baton audit verify --head``;
the metrics publish the count and the last seq for a monitor to compare). What is recorded:

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
import hashlib
import hmac
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from baton.errors import BatonError, StoreError, UsageError
from baton.store import AuditEntry, Store
from baton.store.base import GENESIS, audit_hash

if TYPE_CHECKING:
    from baton.engine import Engine, Event

log = structlog.get_logger("baton.audit")

SYSTEM = "system"
ENDINGS = ("run.completed", "run.failed", "run.cancelled")
DRAIN_DELAY_S = 0.01
#: how long an entry the store could not take for a transient reason is tried again
RETRY_S = 15.0
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
    """Append an entry; a store that cannot take it is logged, never fatal to the action.
    A transient error (the database restarting) is tried again for up to RETRY_S: what
    was done stays on the trail through a restart (an entry whose commit went through but
    whose answer was lost may then be there twice)."""
    ts, deadline, pause = time.time(), time.monotonic() + RETRY_S, 0.05
    while True:
        try:
            return await store.audit_append(ts, actor, action, subject, detail)
        except BatonError as exc:
            if isinstance(exc, StoreError) and exc.transient and time.monotonic() + pause < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            said = {"actor": actor, "action": action, "subject": subject, "error": exc.message}
            log.error("audit entry not written", **said)
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


#: the environment variable that holds the trail's key (the key itself), and the one that
#: names its key file
KEY_ENV, KEY_FILE_ENV = "BATON_AUDIT_KEY", "BATON_AUDIT_KEY_FILE"
#: the key file's name beside a SQLite database
DEFAULT_KEY_FILE = "audit.key"
MIN_KEY_CHARS = 16
#: the entry that starts the keyed part of a trail written without a key before
KEYED = "audit.keyed"


def key_configured() -> bool:
    """Whether the environment gives the trail's key (or its file)."""
    return bool(os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV))


def load_key(path: str | Path | None = None, beside: Path | None = None) -> bytes | None:
    """The trail's key: ``BATON_AUDIT_KEY``; else the file at ``path`` (or named by
    ``BATON_AUDIT_KEY_FILE``), which must not be readable by others; else ``audit.key`` in
    the directory ``beside`` (a SQLite database's), made 0600 with a random key when
    missing. None when there is none of these (PostgreSQL without a key configured: the
    chain is plain SHA-256). UsageError when the key or its file will not do."""
    given = os.environ.get(KEY_ENV)
    if given:
        if len(given) < MIN_KEY_CHARS:
            raise UsageError(f"{KEY_ENV} must be at least {MIN_KEY_CHARS} characters (use a random one)")
        return given.encode()
    named = path or os.environ.get(KEY_FILE_ENV)
    if named is None and beside is None:
        return None
    file = Path(named) if named is not None else Path(beside or ".") / DEFAULT_KEY_FILE
    if named is None:
        with contextlib.suppress(OSError):  # a directory it cannot write: said below
            file.parent.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            _make_key(file)
    try:
        mode = file.stat().st_mode
        key = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read the audit key {file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if mode & 0o077:
        raise UsageError(f"the audit key {file} may be read by others: chmod 600 {file}")
    if len(key) < MIN_KEY_CHARS:
        raise UsageError(f"the audit key {file} must hold at least {MIN_KEY_CHARS} characters")
    return key.encode()


def _make_key(file: Path) -> None:
    """Write a random key to ``file`` (0600), whole or not at all: processes starting at once
    on a new database all read the one that got there first."""
    draft = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(draft, file)
    except OSError as exc:
        raise UsageError(f"cannot make the audit key {file}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(draft)


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    #: the first entry that does not chain (None when the chain holds)
    broken_at: int | None = None
    problem: str | None = None
    #: how many entries, the first ones, were written before the trail had a key
    unkeyed: int = 0
    #: the seq and hash of the last entry (None: no entry)
    last_seq: int | None = None
    last_hash: str | None = None


async def verify(store: Store, key: bytes | None = None, page: int = 1000) -> Verification:
    """Check the whole chain: each entry's hash (under ``key``, by default the store's), and
    that it names the one before. Entries chained without a key are accepted only before the first keyed one
    (a trail that got its key later): a keyed chain cannot go back to plain hashes."""
    key = key if key is not None else store.audit_key
    prev, count, after, unkeyed, keyed = GENESIS, 0, 0, 0, False
    last: AuditEntry | None = None
    while True:
        entries = await store.audit_entries(after=after, limit=page)
        for e in entries:
            if e.prev_hash != prev:
                return Verification(False, count, e.seq, "it does not follow the entry before it", unkeyed)
            content = (e.prev_hash, e.ts, e.actor, e.action, e.subject, e.detail)
            if key is not None and hmac.compare_digest(audit_hash(*content, key), e.hash):
                if not keyed and unkeyed and e.action != KEYED:
                    why = f"it follows {unkeyed} entries without a key, and is not the {KEYED} entry"
                    return Verification(False, count, e.seq, why, unkeyed)
                keyed = True
            elif (key is None or not keyed) and audit_hash(*content) == e.hash:
                unkeyed += key is not None
            else:
                why = "its content does not match its hash"
                if key is not None and count == 0:
                    why += " (or the trail was written under another key)"
                return Verification(False, count, e.seq, why, unkeyed)
            prev, count, after, last = e.hash, count + 1, e.seq, e
        if len(entries) < page:
            break
    if unkeyed and not keyed:
        why = (
            f"none of its {unkeyed} entries is keyed: written without the key (by someone who does not"
            " have it, or before the trail had one: then `baton audit adopt-key`, once)"
        )
        return Verification(False, count, None, why, unkeyed)
    seq, digest = (last.seq, last.hash) if last is not None else (None, None)
    return Verification(True, count, unkeyed=unkeyed, last_seq=seq, last_hash=digest)


async def adopt_key(store: Store, key: bytes | None) -> bool:
    """A trail written without a key (before it had one) gets the ``audit.keyed`` entry,
    keyed: from there on every entry is, and :func:`verify` accepts plain entries only
    before it. Done when the key is made (the first start of a version with keys) or by
    ``baton audit adopt-key``: never on its own otherwise, or a trail rewritten without the
    key would be adopted too. Whether it added the entry."""
    if key is None:
        return False
    _, last = await store.audit_tail()
    if last is None:
        return False
    content = (last.prev_hash, last.ts, last.actor, last.action, last.subject, last.detail)
    if not hmac.compare_digest(audit_hash(*content, key), last.hash) and audit_hash(*content) == last.hash:
        await record(store, SYSTEM, KEYED, "audit", since_seq=last.seq)
        return True
    return False


@dataclass(frozen=True, slots=True)
class Head:
    """What the trail was at one moment: its entry count and last entry, signed with its
    key, to keep outside the database and compare later (:func:`check_head`)."""

    entries: int
    last_seq: int
    last_hash: str
    at: float
    signature: str

    @staticmethod
    def sign(key: bytes, entries: int, last_seq: int, last_hash: str, at: float) -> str:
        message = f"baton-audit-head:{entries}:{last_seq}:{last_hash}:{at:.6f}".encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "at": self.at,
            "signature": self.signature,
        }

    @classmethod
    def of(cls, data: Any) -> Head:
        """A head read back (UsageError when it is not one)."""
        try:
            return cls(
                int(data["entries"]),
                int(data["last_seq"]),
                str(data["last_hash"]),
                float(data["at"]),
                str(data["signature"]),
            )
        except (TypeError, KeyError, ValueError):
            raise UsageError(
                "a head is the JSON `baton audit head` prints: entries, last_seq, last_hash, at, signature"
            ) from None


async def head(store: Store, key: bytes | None) -> Head:
    """The trail's head now, signed (UsageError without a key: nothing to sign with)."""
    if key is None:
        raise UsageError(f"the audit trail has no key: set {KEY_ENV} or {KEY_FILE_ENV} to sign its head")
    result = await verify(store, key)
    if not result.ok:
        raise UsageError(f"the audit trail is broken at entry {result.broken_at}: {result.problem}")
    seq, digest, at = result.last_seq or 0, result.last_hash or GENESIS, round(time.time(), 6)
    return Head(result.entries, seq, digest, at, Head.sign(key, result.entries, seq, digest, at))


async def check_head(store: Store, key: bytes | None, given: Head) -> Verification:
    """Verify the chain, and that the trail still holds what ``given`` (an earlier head)
    says it held: its entry still there with its hash, and at least as many entries."""
    if key is None:
        raise UsageError(f"the audit trail has no key: set {KEY_ENV} or {KEY_FILE_ENV} to check a head")
    expected = Head.sign(key, given.entries, given.last_seq, given.last_hash, given.at)
    if not hmac.compare_digest(expected, given.signature):
        raise UsageError("the head's signature does not match: it was not signed with this trail's key")
    result = await verify(store, key)
    if not result.ok:
        return result
    if result.entries < given.entries:
        problem = (
            f"it holds {result.entries} entries, fewer than the head's {given.entries}: entries were removed"
        )
        return Verification(False, result.entries, given.last_seq, problem, result.unkeyed)
    if given.entries:
        found = await store.audit_entries(after=given.last_seq - 1, limit=1)
        if not found or found[0].seq != given.last_seq or found[0].hash != given.last_hash:
            problem = "the head's last entry is not there as it was: the trail was cut or rewritten"
            return Verification(False, result.entries, given.last_seq, problem, result.unkeyed)
    return result


__all__ = [
    "SYSTEM",
    "Head",
    "RunEndings",
    "Verification",
    "adopt_key",
    "check_head",
    "cli_actor",
    "head",
    "load_key",
    "python_actor",
    "record",
    "verify",
]
