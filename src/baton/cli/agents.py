"""`baton classify`: the task type of a description, or of each line of a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from baton.agents.classify import TASK_TYPES, Classification, check_language, check_text, classify
from baton.cli import EXIT_OK, JsonOption, _emit_json, _execute, _out, _Session, app
from baton.errors import UsageError
from baton.plan.reader import Refused, read_text

#: a batch file larger than this is refused before it is read
MAX_BATCH_BYTES = 50 * 1024 * 1024


def _among(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    wrong = [n for n in names if n not in TASK_TYPES]
    if not names or wrong:
        raise UsageError(f"--among: unknown task type(s) {wrong or [text]} (known: {', '.join(TASK_TYPES)})")
    return names


def _batch(path: Path) -> list[tuple[str, str | None]]:
    """(text, language) of each line: a JSON string, or an object with "text" (and "language")."""
    try:
        lines = read_text(path, MAX_BATCH_BYTES).splitlines()
    except Refused as exc:
        raise UsageError(str(exc)) from None
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} cannot be read: {exc}") from None
    tasks: list[tuple[str, str | None]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if isinstance(item, dict) and "text" in item:
            text, language = item["text"], item.get("language")
        elif isinstance(item, str):
            text, language = item, None
        else:
            raise UsageError(f'{path} line {number}: expected a string or an object with "text"')
        try:
            tasks.append((check_text(text), check_language(language)))
        except UsageError as exc:
            raise UsageError(f"{path} line {number}: {exc.message}") from None
    return tasks


@app.command("classify")
def classify_command(
    text: Annotated[str | None, typer.Argument(help="The task, in words.", show_default=False)] = None,
    language: Annotated[str | None, typer.Option("--language", "-l", help="Its language.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help='A JSONL file: one task a line (a string, or {"text", "language"}).'
        ),
    ] = None,
    among: Annotated[
        str | None, typer.Option("--among", help="Only these task types, comma-separated.")
    ] = None,
    no_semantic: Annotated[
        bool, typer.Option("--no-semantic", help="Rules only: never load the embedding model.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """The task type of a description (rules, then the embeddings, else general)."""
    session = _Session(json=json_out, db="")

    async def body() -> int:
        if (text is None) == (file is None):
            raise UsageError("give a task description or --file, not both")
        tasks = _batch(file) if file is not None else [(check_text(text), check_language(language))]
        types = _among(among)
        results = [classify(t, lang or language, among=types, semantic=not no_semantic) for t, lang in tasks]
        if json_out:
            if file is None:
                _emit_json(results[0].to_dict())
            else:
                for (task, _), result in zip(tasks, results, strict=True):
                    print(json.dumps({"text": task, **result.to_dict()}, ensure_ascii=False))
            return EXIT_OK
        _print(tasks, results)
        return EXIT_OK

    _execute(session, body)


def _print(tasks: list[tuple[str, str | None]], results: list[Classification]) -> None:
    table = Table(box=box.SIMPLE, show_edge=False)
    for column in ("type", "confidence", "method", "task"):
        table.add_column(column, overflow="fold")
    for (task, _), result in zip(tasks, results, strict=True):
        table.add_row(result.type, f"{result.confidence:.2f}", result.method, task)
    _out.print(table)
