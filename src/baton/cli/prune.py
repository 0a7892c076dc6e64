"""`baton prune`: delete what ended long ago (runs, standalone jobs, expired cache entries).

Runs under way (pending, running, paused) are never touched, whatever their age. The audit
trail is kept whole, and the prune is an entry of it, so `baton audit verify` still holds.
On SQLite the space is given back to the file system afterwards (VACUUM).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from baton.audit import cli_actor
from baton.cli import (
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
from baton.errors import UsageError
from baton.status import RunStatus
from baton.store import DEFAULT_DB
from baton.store.base import PRUNABLE, PruneResult

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
ENDS = ",".join(map(str, PRUNABLE))


def parse_duration(text: str, option: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` (or ``2w``) in seconds; UsageError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(
            f"{option} {text!r} is not a duration: a number and a unit (s, m, h, d or w), "
            "such as 30d, 12h, 90m or 3600s"
        )
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_statuses(text: str) -> list[RunStatus]:
    """``completed,failed,cancelled`` (any of them); UsageError for anything else."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    wrong = [n for n in names if n not in ENDS.split(",")]
    if not names or wrong:
        under_way = [n for n in wrong if n in set(RunStatus)]
        if under_way:
            said = f"{', '.join(under_way)} runs are under way: they are never pruned"
        else:
            said = f"unknown status {', '.join(map(repr, wrong))}" if wrong else "no status"
        raise UsageError(f"--status {text!r}: {said}; give one or more of {ENDS}")
    return [RunStatus(n) for n in names]


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Remove what ended more than this long ago: 30d, 12h, 90m, 3600s.",
            show_default=False,
        ),
    ],
    status: Annotated[
        str,
        typer.Option(
            "--status",
            help="Which ends to remove, comma-separated: runs that ended so, and standalone jobs "
            "that did (failed: discarded jobs).",
        ),
    ] = ENDS,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
    vacuum: Annotated[
        bool,
        typer.Option(
            "--vacuum/--no-vacuum",
            help="SQLite: give the space back to the file system afterwards (VACUUM: other "
            "processes wait for the database meanwhile).",
        ),
    ] = True,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Steps, jobs or cache entries per transaction.")
    ] = 500,
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
) -> None:
    """Delete runs and standalone jobs that ended long ago, with their steps, attempts, plans
    and budgets, and cache entries that expired.

    Runs pending, running or paused stay, whatever their age; so does the audit trail (the
    prune is an entry of it). Exit 2, with nothing changed, on a bad --older-than or --status.
    """
    session = _Session(json_out, db)

    async def body() -> int:
        age = parse_duration(older_than, "--older-than")  # before the database opens
        statuses = parse_statuses(status)
        before = time.time() - age
        async with _engine(db, must_exist=True) as engine:
            result = await engine.prune(before, statuses, batch=batch, dry_run=dry_run, actor=cli_actor())
            sizes = await engine.store.reclaim() if vacuum and result.removed and not dry_run else None
        if json_out:
            doc: dict[str, Any] = {
                "dry_run": dry_run,
                "before": datetime.fromtimestamp(before, UTC).isoformat(),
                "older_than_s": age,
                "statuses": [str(s) for s in statuses],
                **result.counts(),
                "file_bytes_before": sizes[0] if sizes else None,
                "file_bytes_after": sizes[1] if sizes else None,
            }
            _emit_json(doc)
            return EXIT_OK
        _print(result, before, statuses, dry_run, sizes)
        return EXIT_OK

    _execute(session, body)


def _print(
    result: PruneResult,
    before: float,
    statuses: list[RunStatus],
    dry_run: bool,
    sizes: tuple[int, int] | None,
) -> None:
    ends = ", ".join(map(str, statuses))
    if not result.removed:
        _out.print(Text(f"nothing ended ({ends}) before {_local(before)}: nothing to prune"))
        return
    verb = "would prune" if dry_run else "pruned"
    _out.print(Text.assemble((verb, "bold"), f" what ended ({ends}) before {_local(before)}:"))
    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False, show_edge=False)
    table.add_column("what")
    table.add_column("how many", justify="right")
    rows = [
        ("runs", f"{result.runs:,}"),
        ("  their steps", f"{result.steps:,}"),
        ("standalone jobs", f"{result.jobs:,}"),
        ("attempt records", f"{result.attempts:,}"),
        ("expired cache entries", f"{result.cache:,}"),
        ("text they held", _bytes(result.bytes)),
    ]
    if sizes is not None:
        rows.append(("database on disk", f"{_bytes(sizes[0])} -> {_bytes(sizes[1])}"))
    for row in rows:
        table.add_row(*row)
    _out.print(table)
    if dry_run:
        _out.print(Text("  nothing was deleted (--dry-run)"))
