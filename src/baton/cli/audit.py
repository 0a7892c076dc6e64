"""`baton audit`: read and verify the audit trail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from baton import audit
from baton.cli import (
    EXIT_FAILED,
    EXIT_OK,
    DbOption,
    JsonOption,
    _emit_json,
    _engine,
    _execute,
    _local,
    _out,
    _Session,
    app,
)
from baton.engine import Engine
from baton.errors import UsageError
from baton.store import DEFAULT_DB
from baton.views import AuditView

audit_app = typer.Typer(
    help="The audit trail: who did what, how runs ended; verify its chain.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


@audit_app.command("list")
def audit_list(
    run: Annotated[str | None, typer.Option("--run", help="Only the entries about this run.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many entries.")] = 1000,
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
) -> None:
    """Entries of the trail, oldest first."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            entries = await engine.store.audit_entries(subject=run, limit=limit)
        if json_out:
            _emit_json([AuditView.of(e).model_dump() for e in entries])
            return EXIT_OK
        table = Table("seq", "when", "actor", "action", "subject", "detail")
        for e in entries:
            detail = ", ".join(f"{k}={v}" for k, v in e.detail.items())
            table.add_row(str(e.seq), _local(e.ts), e.actor, e.action, e.subject, detail)
        _out.print(table)
        return EXIT_OK

    _execute(session, body)


AuditKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--audit-key",
        metavar="FILE",
        help="The trail's key file (default: BATON_AUDIT_KEY, BATON_AUDIT_KEY_FILE, or audit.key "
        "beside the SQLite database).",
        show_default=False,
    ),
]


def _keyed_engine(db: str, key_file: Path | None) -> Engine:
    return _engine(db, must_exist=True, audit_key=audit.load_key(key_file) if key_file is not None else None)


@audit_app.command("verify")
def audit_verify(
    db: DbOption = DEFAULT_DB,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            metavar="FILE|JSON",
            help="Also check against a head from `baton audit head` (a file, or its JSON): "
            "entries removed since, or rewritten, show.",
        ),
    ] = None,
    key_file: AuditKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check that no entry was changed or removed (exit 1 and where, when one was)."""
    session = _Session(json_out, db)

    async def body() -> int:
        given = _read_head(head) if head is not None else None
        async with _keyed_engine(db, key_file) as engine:
            key = engine.store.audit_key
            if given is not None:
                result = await audit.check_head(engine.store, key, given)
            else:
                result = await audit.verify(engine.store, key)
        if json_out:
            _emit_json(
                {
                    "ok": result.ok,
                    "entries": result.entries,
                    "broken_at": result.broken_at,
                    "problem": result.problem,
                    "keyed": key is not None,
                    "unkeyed_entries": result.unkeyed,
                    "last_seq": result.last_seq,
                    "head_checked": given is not None,
                }
            )
        elif result.ok:
            said = f"audit trail intact: {result.entries} entries"
            if given is not None:
                said += f", the head of {given.entries} entries among them"
            if key is None:
                said += (
                    " (no key: chained by plain SHA-256, which anyone who can write the database can redo)"
                )
            elif result.unkeyed:
                said += f" (the first {result.unkeyed} from before the trail had a key)"
            _out.print(Text(said, style="green"))
        else:
            where = f" at entry {result.broken_at}" if result.broken_at is not None else ""
            _out.print(
                Text(
                    f"audit trail broken{where}: {result.problem} "
                    f"({result.entries} entries before it check out)",
                    style="bold red",
                )
            )
        return EXIT_OK if result.ok else EXIT_FAILED

    _execute(session, body)


def _read_head(given: str) -> audit.Head:
    text = given
    if not given.lstrip().startswith("{"):
        try:
            text = Path(given).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read the head {given}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the head is not JSON: {exc.msg} at line {exc.lineno}") from None
    return audit.Head.of(data)


@audit_app.command("head")
def audit_head(db: DbOption = DEFAULT_DB, key_file: AuditKeyOption = None) -> None:
    """Print the trail's head (its entry count and last hash, signed with its key) as JSON:
    keep it elsewhere, and `baton audit verify --head` shows entries removed since."""
    session = _Session(True, db)

    async def body() -> int:
        async with _keyed_engine(db, key_file) as engine:
            signed = await audit.head(engine.store, engine.store.audit_key)
        _emit_json(signed.to_dict())
        return EXIT_OK

    _execute(session, body)


@audit_app.command("adopt-key")
def audit_adopt_key(db: DbOption = DEFAULT_DB, key_file: AuditKeyOption = None) -> None:
    """Once, for a trail written before it had a key: its keyed part starts here (an
    audit.keyed entry). Check it first with `baton audit verify` under the old version."""
    session = _Session(False, db)

    async def body() -> int:
        async with _keyed_engine(db, key_file) as engine:
            if engine.store.audit_key is None:
                raise UsageError(
                    "no audit key: set BATON_AUDIT_KEY or BATON_AUDIT_KEY_FILE, or pass --audit-key"
                )
            added = await audit.adopt_key(engine.store, engine.store.audit_key)
        _out.print(
            "the trail's keyed part starts now" if added else "nothing to do: the trail is keyed already"
        )
        return EXIT_OK

    _execute(session, body)
