"""`baton audit`: read and verify the audit trail."""

from __future__ import annotations

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


@audit_app.command("verify")
def audit_verify(db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Check that no entry was changed or removed (exit 1 and where, when one was)."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            result = await audit.verify(engine.store)
        if json_out:
            _emit_json(
                {
                    "ok": result.ok,
                    "entries": result.entries,
                    "broken_at": result.broken_at,
                    "problem": result.problem,
                }
            )
        elif result.ok:
            _out.print(Text(f"audit trail intact: {result.entries} entries", style="green"))
        else:
            _out.print(
                Text(
                    f"audit trail broken at entry {result.broken_at}: {result.problem} "
                    f"({result.entries} entries before it check out)",
                    style="bold red",
                )
            )
        return EXIT_OK if result.ok else EXIT_FAILED

    _execute(session, body)
