"""The agent layer's commands: `baton classify` (a task's type), `baton goal` (a task in
words carried out), `baton templates list|show|report`, `baton stats`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from baton.agents.classify import TASK_TYPES, Classification, check_language, check_text, classify
from baton.agents.goals import Agents, GoalResult
from baton.agents.report import report
from baton.agents.templates import Library, Template
from baton.audit import cli_actor
from baton.cli import (
    EXIT_OK,
    DbOption,
    JsonOption,
    LlmOption,
    QuietOption,
    _emit_json,
    _engine,
    _execute,
    _exit_code,
    _flags,
    _out,
    _RunView,
    _Session,
    _watch,
    app,
)
from baton.errors import UsageError
from baton.plan.reader import Refused, read_text
from baton.status import RunStatus
from baton.store import DEFAULT_DB

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


TemplatesOption = Annotated[
    list[Path] | None,
    typer.Option("--templates", help="A directory of your own templates (*.yaml); repeatable."),
]


def _library(folders: list[Path] | None) -> Library:
    return Library.load(folders or [])


@app.command("goal")
def goal_command(
    text: Annotated[str, typer.Argument(help="The task, in words.", show_default=False)],
    language: Annotated[str | None, typer.Option("--language", "-l", help="Its language.")] = None,
    complexity: Annotated[
        str | None, typer.Option("--complexity", "-c", help="simple, medium, complex or crisis.")
    ] = None,
    decompose: Annotated[
        str,
        typer.Option("--decompose", help="template: a template's sub-tasks; planner: a model makes them."),
    ] = "template",
    template: Annotated[
        str | None, typer.Option("--template", help="Use this template (its id) instead of drawing one.")
    ] = None,
    db: DbOption = DEFAULT_DB,
    llm: LlmOption = None,
    templates: TemplatesOption = None,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Carry out a task given in words: classified, a template chosen by what was learned,
    its sub-tasks run as a plan with live progress; the result and what it took.

    Exit codes: 0 completed, 1 failed or cancelled, 2 bad input, 3 paused, 130 interrupted.
    """
    session = _Session(json_out, db, flags=_flags(None, llm))

    async def body() -> int:
        library = _library(templates)  # a bad template file is said before anything is written
        engine = _engine(db, llm=llm)
        async with engine:
            agents = Agents(engine, library)
            handle = await agents.start(
                text,
                language=language,
                complexity=complexity,
                actor=cli_actor(),
                decompose=decompose,
                template=template,
            )
            session.run_id = handle.run_id
            goal = await engine.store.get_goal(handle.run_id)
            assert goal is not None
            if not json_out and not quiet:
                _out.print(
                    Text(
                        f"goal {handle.run_id}: {goal.task_type} ({goal.method}, {goal.confidence:.2f}), "
                        f"template {goal.template_id}"
                    )
                )
            view = await _RunView.load(engine, handle.run_id)
            live = not json_out and not quiet and _out.is_terminal
            record = await _watch(engine, handle, view) if live else await handle.wait()
            session.run_id = None
            await agents.collect()
            result = await agents.result(record.id)
        if json_out:
            _emit_json(result.to_dict())
        else:
            _print_goal(result)
        return _exit_code(RunStatus(result.status))

    _execute(session, body)


def _print_goal(result: GoalResult) -> None:
    m = result.metrics
    _out.print(
        Text(
            f"{result.status}: template {result.template_used}, model {result.model_used or '-'}, "
            f"answered by {result.method}; {m['time_ms']:.0f} ms, {m['tokens_used']} tokens, "
            f"${m['cost_usd']:.6f}, quality {m['quality']:.2f}"
        )
    )
    if result.error:
        _out.print(Text(f"error: {result.error}", style="red"))
    if result.result is not None:
        _out.print(Text(str(result.result)))


templates_app = typer.Typer(help="The templates goals are carried out by, and what was learned of them.")
app.add_typer(templates_app, name="templates")


@templates_app.command("list")
def templates_list(templates: TemplatesOption = None, json_out: JsonOption = False) -> None:
    """Every template: shipped, and your own (--templates)."""
    session = _Session(json_out, "")

    async def body() -> int:
        library = _library(templates)
        rows = sorted(library.templates.values(), key=lambda t: (t.task_type, t.language or "", t.id))
        if json_out:
            _emit_json([_template_row(t) for t in rows])
            return EXIT_OK
        table = Table(box=box.SIMPLE, show_edge=False)
        for column in ("id", "task type", "language", "level", "sub-tasks", "source"):
            table.add_column(column, overflow="fold")
        for t in rows:
            subtasks = " → ".join(s.id for s in t.subtasks) or "(a planner makes them)"
            table.add_row(t.id, t.task_type, t.language or "*", t.level, subtasks, t.source)
        _out.print(table)
        return EXIT_OK

    _execute(session, body)


def _template_row(t: Template) -> dict[str, object]:
    return {
        "id": t.id,
        "task_type": t.task_type,
        "language": t.language,
        "level": t.level,
        "subtasks": [s.id for s in t.subtasks],
        "planner": t.planner is not None,
        "source": t.source,
    }


@templates_app.command("show")
def templates_show(
    template_id: Annotated[str, typer.Argument(help="The template's id.", show_default=False)],
    templates: TemplatesOption = None,
    json_out: JsonOption = False,
) -> None:
    """One template in full."""
    session = _Session(json_out, "")

    async def body() -> int:
        template = _library(templates).get(template_id)
        doc = template.model_dump(by_alias=True, exclude_none=True)
        if json_out:
            _emit_json({**doc, "level": template.level, "source": template.source})
        else:
            _out.print(Text(f"# {template.source} ({template.level})"))
            _out.print(Text(template.to_yaml()))
        return EXIT_OK

    _execute(session, body)


@templates_app.command("report")
def templates_report(
    db: DbOption = DEFAULT_DB,
    templates: TemplatesOption = None,
    json_out: JsonOption = False,
) -> None:
    """Templates ranked by what the outcomes say (posterior mean, counts, a 90% interval),
    per task and language, and what to use more or less, when the evidence says so."""
    session = _Session(json_out, db)

    async def body() -> int:
        library = _library(templates)
        async with _engine(db, must_exist=True) as engine:
            doc = await report(Agents(engine, library))
        if json_out:
            _emit_json(doc)
            return EXIT_OK
        if not doc["cells"]:
            _out.print(Text("no goal has been recorded yet"))
        for cell in doc["cells"]:
            _out.print(Text(f"{cell['cell']}: {cell['goals']} goal(s)", style="bold"))
            table = Table(box=box.SIMPLE, show_edge=False)
            for column in ("template", "uses", "successes", "mean", "90% interval", "P(best)", "cost"):
                table.add_column(column)
            for row in cell["templates"]:
                low, high = row["interval"]
                cost = row["ema_cost_usd"]
                table.add_row(
                    row["id"],
                    str(row["uses"]),
                    str(row["successes"]),
                    f"{row['mean']:.2f}",
                    f"{low:.2f}-{high:.2f}",
                    f"{row['chance_best']:.2f}",
                    "-" if cost is None else f"${cost:.6f}",
                )
            _out.print(table)
            _out.print(Text(cell["recommendation"]))
        return EXIT_OK

    _execute(session, body)


@app.command("stats")
def stats_command(db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Goals carried out: how many, their average time, success rate, template usage."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            doc = await engine.agents.stats()
        if json_out:
            _emit_json(doc)
            return EXIT_OK
        average = doc["average_time_s"]
        rate = doc["success_rate"]
        _out.print(
            Text(
                f"{doc['total_executions']} goal(s)"
                + ("" if average is None else f", {average:.2f} s on average")
                + ("" if rate is None else f", {100 * rate:.0f}% succeeded")
            )
        )
        for template_id, uses in doc["template_usage"].items():
            _out.print(Text(f"  {template_id}: {uses}"))
        return EXIT_OK

    _execute(session, body)
