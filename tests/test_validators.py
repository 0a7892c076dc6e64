"""Output validators: each kind, severities, and what a step's attempts record."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from baton import Engine, RunStatus
from baton.errors import PlanError
from baton.validators import Issue, option_problems, run_checks

PY = sys.executable


def short_words(value: str) -> list[str]:
    """A custom check: words longer than 12 letters."""
    return [f"word too long: {w}" for w in value.split() if len(w) > 12]


async def check(value: Any, *specs: dict[str, Any], tmp_path: Path) -> list[Issue]:
    for spec in specs:
        assert option_problems(spec["kind"], spec) == [], spec
    return await run_checks(value, list(specs), tmp_path)


async def test_each_kind_finds_what_it_should(tmp_path: Path) -> None:
    assert [str(i) for i in await check("def f(:", {"kind": "python_syntax"}, tmp_path=tmp_path)] == [
        "python_syntax: line 1: invalid syntax"
    ]
    assert await check("def f(): pass", {"kind": "python_syntax"}, tmp_path=tmp_path) == []
    assert [str(i) for i in await check('{"a": 1,}', {"kind": "json"}, tmp_path=tmp_path)] == [
        "json: Expecting property name enclosed in double quotes at line 1 column 9"
    ]
    schema = {"type": "object", "required": ["title"], "properties": {"n": {"type": "integer"}}}
    issues = await check('{"n": "x"}', {"kind": "json_schema", "schema": schema}, tmp_path=tmp_path)
    assert [str(i) for i in issues] == [
        "json_schema: (root): 'title' is a required property",
        "json_schema: n: 'x' is not of type 'integer'",
    ]
    assert (
        await check({"title": "t", "n": 1}, {"kind": "json_schema", "schema": schema}, tmp_path=tmp_path)
        == []
    )
    assert [str(i) for i in await check("abc", {"kind": "regex", "pattern": "^x"}, tmp_path=tmp_path)] == [
        "regex: output does not match '^x'"
    ]
    assert [str(i) for i in await check("", {"kind": "not_empty"}, tmp_path=tmp_path)] == [
        "not_empty: output is empty"
    ]
    assert [str(i) for i in await check(42, {"kind": "regex", "pattern": "x"}, tmp_path=tmp_path)] == [
        "regex: expected text, got int"
    ]


async def test_a_command_checks_the_value_on_stdin_or_in_a_file(tmp_path: Path) -> None:
    on_stdin = {"kind": "command", "argv": [PY, "-c", "import sys; sys.exit('bad' in sys.stdin.read())"]}
    assert await check("good", on_stdin, tmp_path=tmp_path) == []
    assert [str(i) for i in await check("bad", on_stdin, tmp_path=tmp_path)] == [
        f"command: {PY} exited with 1"
    ]
    compiles = {"kind": "command", "argv": [PY, "-m", "py_compile", "{file}"], "filename": "code.py"}
    assert await check("x = 1\n", compiles, tmp_path=tmp_path) == []
    (issue,) = await check("x = = 1\n", compiles, tmp_path=tmp_path)
    assert issue.message.startswith(f"{PY} exited with 1") and "SyntaxError" in issue.message


async def test_a_python_function_checks_the_value(tmp_path: Path) -> None:
    spec = {"kind": "python", "function": "tests.test_validators:short_words"}
    assert await check("short words only", spec, tmp_path=tmp_path) == []
    assert [str(i) for i in await check("incomprehensibilities", spec, tmp_path=tmp_path)] == [
        "python: word too long: incomprehensibilities"
    ]


def test_bad_declarations_are_found_before_running() -> None:
    assert option_problems("spell", {}) == [
        "unknown validator kind 'spell'"
        " (known: command, json, json_schema, not_empty, python, python_syntax, regex)"
    ]
    assert option_problems("regex", {"pattern": "(", "severity": "fatal"}) == [
        "severity must be one of critical, error, warning, info, not 'fatal'",
        "regex pattern '(' does not compile: missing ), unterminated subpattern at position 0",
    ]
    assert option_problems("json_schema", {"schema": {"type": "nope"}})[0].startswith(
        "json_schema 'schema' is not a valid JSON Schema"
    )
    assert option_problems("command", {"argv": "ls"}) == [
        "command validator needs 'argv': a non-empty list of strings"
    ]
    assert option_problems("python", {"function": "no_such_module_x:f"})[0].startswith(
        "python validator function 'no_such_module_x:f' cannot be used"
    )


async def test_warnings_are_kept_with_the_attempt_and_errors_fail_it(tmp_path: Path) -> None:
    async with Engine("memory://", workdir=tmp_path) as engine:
        record = await engine.run(
            {
                "name": "v",
                "steps": [
                    {
                        "id": "a",
                        "task": "echo",
                        "with": {"text": "hello"},
                        "validate": [
                            {"kind": "regex", "field": "text", "pattern": "^h"},
                            {"kind": "regex", "field": "text", "pattern": "!$", "severity": "warning"},
                        ],
                    },
                    {
                        "id": "b",
                        "task": "echo",
                        "with": {"text": "hello"},
                        "validate": [
                            {"kind": "regex", "field": "text", "pattern": "^x", "severity": "critical"}
                        ],
                    },
                ],
            }
        )
        attempts = {a.step_id: a for a in await engine.store.get_attempts(record.id)}
    assert record.status is RunStatus.FAILED
    assert attempts["a"].status == "succeeded"
    assert attempts["a"].detail == {
        "issues": [{"severity": "warning", "kind": "regex", "message": "output does not match '!$'"}]
    }
    assert attempts["b"].status == "failed"
    assert attempts["b"].error == "validation failed: regex: output does not match '^x'"


async def test_a_bad_validator_rejects_the_plan(tmp_path: Path) -> None:
    async with Engine("memory://", workdir=tmp_path) as engine:
        with pytest.raises(
            PlanError, match=r"steps\[0\]\.validate\[0\]: json_schema validator needs a 'schema'"
        ):
            await engine.submit(
                {"name": "v", "steps": [{"id": "a", "task": "echo", "validate": [{"kind": "json_schema"}]}]}
            )
