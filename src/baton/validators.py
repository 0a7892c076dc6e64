"""Output validators: checks a step's output must pass for its attempt to count.

Each check reports issues with a severity. Issues of severity ``critical`` or ``error``
fail the attempt, so the step retries with them on record (model steps get them in their
next prompt); ``warning`` and ``info`` issues are kept with the attempt and do not fail it.
A validator reads the output part named by ``field`` (a dotted path; the whole output when
absent) and may set its own ``severity`` (default ``error``).

Kinds: ``python_syntax``, ``json``, ``json_schema`` (``schema``), ``regex`` (``pattern``),
``not_empty``, ``command`` (``argv``: runs a program on the value, which it gets on stdin
or in the file named by ``{file}`` in argv; a non-zero exit is an issue), and ``python``
(``function``: a dotted path to a callable of the value that returns a list of messages,
a message, or True/False/None).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema

from baton.errors import TaskFailed
from baton.sandbox import Confinement

Severity = Literal["critical", "error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "error", "warning", "info")
FAILING: frozenset[str] = frozenset({"critical", "error"})
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Issue:
    severity: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "message": self.message}


@dataclass(frozen=True, slots=True)
class Where:
    """Where a step's checks run: its working directory, its confinement if any."""

    cwd: Path
    confinement: Confinement | None = None


Check = Callable[[Any, Mapping[str, Any], Where], Awaitable[list[str]]]


def _text(value: Any, kind: str) -> str:
    if not isinstance(value, str):
        raise _Wrong(f"expected text, got {type(value).__name__}")
    return value


class _Wrong(Exception):
    """The value is not of a type the check can read."""


async def _python_syntax(value: Any, _opts: Mapping[str, Any], _where: Where) -> list[str]:
    try:
        ast.parse(_text(value, "python_syntax"))
    except SyntaxError as exc:
        return [f"line {exc.lineno}: {exc.msg}"]
    return []


async def _json(value: Any, _opts: Mapping[str, Any], _where: Where) -> list[str]:
    try:
        json.loads(_text(value, "json"))
    except json.JSONDecodeError as exc:
        return [f"{exc.msg} at line {exc.lineno} column {exc.colno}"]
    return []


async def _json_schema(value: Any, opts: Mapping[str, Any], _where: Where) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return [f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    validator = jsonschema.Draft202012Validator(opts["schema"])
    problems = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{where}: {error.message}")
    return problems[:10]


async def _regex(value: Any, opts: Mapping[str, Any], _where: Where) -> list[str]:
    pattern = str(opts["pattern"])
    if re.search(pattern, _text(value, "regex")) is None:
        return [f"output does not match {pattern!r}"]
    return []


async def _not_empty(value: Any, _opts: Mapping[str, Any], _where: Where) -> list[str]:
    empty = value is None or (isinstance(value, str | list | dict) and not value)
    return ["output is empty"] if empty else []


async def _command(value: Any, opts: Mapping[str, Any], where: Where) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    argv = [str(a) for a in opts["argv"]]
    timeout = float(opts.get("timeout_s", COMMAND_TIMEOUT_S))
    name = str(opts.get("filename", "output.txt"))
    problem = _filename_problem(name)
    if problem:
        return [problem]
    # here, not at the top: the tasks import the plan model, which imports this module
    from baton.tasks.builtins import INHERITED_ENV, run_program

    confined = where.confinement
    # a confined check's file is in its run's workspace, where its user may read it
    with tempfile.TemporaryDirectory(
        prefix=".baton-check-", dir=confined.workspace if confined else None
    ) as tmp:
        path = Path(tmp) / name
        uses_file = any("{file}" in a for a in argv)
        if uses_file:
            path.write_text(text, encoding="utf-8")
            # relative to the workspace (its cwd) for a confined check: its user may not pass
            # through the directories above it
            given = f"{Path(tmp).name}/{name}" if confined else str(path)
            argv = [a.replace("{file}", given) for a in argv]
            if confined is not None and confined.user is not None:
                os.chown(tmp, *confined.user)
                os.chown(path, *confined.user)
        env = confined.env() if confined else {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        try:
            code, out, err = await run_program(
                "command", argv, where.cwd, env, None if uses_file else text, timeout, confined
            )
        except TaskFailed as exc:
            return [exc.message.removeprefix("command: ")]
    if code == 0:
        return []
    tail = (out + err).strip().splitlines()[-8:]
    return [f"{argv[0]} exited with {code}" + (": " + " / ".join(tail) if tail else "")]


def _filename_problem(name: str) -> str | None:
    """Why ``name`` may not be the command validator's file name (a plain name only)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"command validator 'filename' must be a plain file name, not {name!r}"
    return None


def _import(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return target  # type: ignore[no-any-return]


async def _python(value: Any, opts: Mapping[str, Any], _where: Where) -> list[str]:
    verdict = _import(str(opts["function"]))(value)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    if verdict is None or verdict is True:
        return []
    if verdict is False:
        return [f"{opts['function']} rejected the output"]
    if isinstance(verdict, str):
        return [verdict] if verdict else []
    return [str(v) for v in verdict]


CHECKS: dict[str, Check] = {
    "python_syntax": _python_syntax,
    "json": _json,
    "json_schema": _json_schema,
    "regex": _regex,
    "not_empty": _not_empty,
    "command": _command,
    "python": _python,
}


def option_problems(kind: str, opts: Mapping[str, Any]) -> list[str]:
    """Problems with a validator declaration, found before anything runs."""
    if kind not in CHECKS:
        return [f"unknown validator kind {kind!r} (known: {', '.join(sorted(CHECKS))})"]
    problems: list[str] = []
    severity = opts.get("severity", "error")
    if severity not in SEVERITIES:
        problems.append(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    field = opts.get("field")
    if field is not None and not isinstance(field, str):
        problems.append("validator 'field' must be a dotted path string")
    if kind == "regex":
        pattern = opts.get("pattern")
        if not isinstance(pattern, str):
            problems.append("regex validator needs a string 'pattern'")
        else:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"regex pattern {pattern!r} does not compile: {exc}")
    elif kind == "json_schema":
        schema = opts.get("schema")
        if not isinstance(schema, dict):
            problems.append("json_schema validator needs a 'schema' mapping")
        else:
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                problems.append(f"json_schema 'schema' is not a valid JSON Schema: {exc.message}")
    elif kind == "command":
        argv = opts.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            problems.append("command validator needs 'argv': a non-empty list of strings")
        filename = opts.get("filename", "output.txt")
        problem = (
            _filename_problem(filename)
            if isinstance(filename, str)
            else "command validator 'filename' must be text"
        )
        if problem:
            problems.append(problem)
    elif kind == "python":
        function = opts.get("function")
        if not isinstance(function, str):
            problems.append("python validator needs 'function': 'package.module:callable'")
        else:
            try:
                _import(function)
            except (ImportError, AttributeError, TypeError, ValueError) as exc:
                problems.append(f"python validator function {function!r} cannot be used: {exc}")
    return problems


def _pick(output: Any, field: Any) -> Any:
    value = output
    if isinstance(field, str) and field:
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    return value


async def run_checks(
    output: Any, validators: Sequence[Mapping[str, Any]], cwd: Path, confinement: Confinement | None = None
) -> list[Issue]:
    """Every issue the validators find in ``output`` (empty when all pass); programs
    (the command validator) run in ``cwd``, confined like the step's when it is."""
    where = Where(cwd, confinement)
    issues: list[Issue] = []
    for spec in validators:
        kind = str(spec["kind"])
        severity = str(spec.get("severity", "error"))
        try:
            messages = await CHECKS[kind](_pick(output, spec.get("field")), spec, where)
        except _Wrong as exc:
            messages = [str(exc)]
        except Exception as exc:  # a user's check that breaks is an issue, not a crash
            messages = [f"the check itself failed: {type(exc).__name__}: {exc}"]
        issues += [Issue(severity, kind, m) for m in messages]
    return issues
