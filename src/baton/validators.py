"""Output validators: checks a step's output must pass for its attempt to count.

A failed check fails the attempt, so the step retries with the errors on record (the LLM
gateway feeds them back into the next prompt). Each validator names the output part it
reads with ``field`` (a dotted path; the whole output when absent).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Check = Callable[[Any, Mapping[str, Any]], list[str]]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _python_syntax(value: Any, _opts: Mapping[str, Any]) -> list[str]:
    text = _text(value)
    if text is None:
        return [f"python_syntax: expected text, got {type(value).__name__}"]
    try:
        ast.parse(text)
    except SyntaxError as exc:
        return [f"python_syntax: line {exc.lineno}: {exc.msg}"]
    return []


def _json(value: Any, _opts: Mapping[str, Any]) -> list[str]:
    text = _text(value)
    if text is None:
        return [f"json: expected text, got {type(value).__name__}"]
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"json: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    return []


def _regex(value: Any, opts: Mapping[str, Any]) -> list[str]:
    text = _text(value)
    if text is None:
        return [f"regex: expected text, got {type(value).__name__}"]
    pattern = str(opts.get("pattern", ""))
    if re.search(pattern, text) is None:
        return [f"regex: output does not match {pattern!r}"]
    return []


def _not_empty(value: Any, _opts: Mapping[str, Any]) -> list[str]:
    empty = value is None or (isinstance(value, str | list | dict) and not value)
    return ["not_empty: output is empty"] if empty else []


CHECKS: dict[str, Check] = {
    "python_syntax": _python_syntax,
    "json": _json,
    "regex": _regex,
    "not_empty": _not_empty,
}


def option_problems(kind: str, opts: Mapping[str, Any]) -> list[str]:
    """Problems with a validator declaration, found before anything runs."""
    if kind not in CHECKS:
        return [f"unknown validator kind {kind!r} (known: {', '.join(sorted(CHECKS))})"]
    if kind == "regex":
        pattern = opts.get("pattern")
        if not isinstance(pattern, str):
            return ["regex validator needs a string 'pattern'"]
        try:
            re.compile(pattern)
        except re.error as exc:
            return [f"regex pattern {pattern!r} does not compile: {exc}"]
    field = opts.get("field")
    if field is not None and not isinstance(field, str):
        return ["validator 'field' must be a dotted path string"]
    return []


def run_checks(output: Any, validators: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every error the validators find in ``output`` (empty when all pass)."""
    errors: list[str] = []
    for spec in validators:
        value = output
        field = spec.get("field")
        if isinstance(field, str) and field:
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        errors += CHECKS[str(spec["kind"])](value, spec)
    return errors
