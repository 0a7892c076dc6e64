"""Classification of task descriptions: the rules, the embeddings when no rule is sure,
`general` when nothing is; `baton classify` for one task and for a JSONL batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from baton.agents import GENERAL, classify
from baton.agents.classify import MAX_CHARS
from baton.errors import UsageError
from baton.llm.config import semantic_extra_installed

needs_semantic = pytest.mark.skipif(not semantic_extra_installed(), reason="needs the semantic extra")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Create a NATS consumer for processing user events", "nats_consumer"),
        ("Add unit tests for the invoice parser", "testing"),
        ("Fix the crash when the list is empty", "bugfix"),
        ("Refactor the session module and rename its helpers", "refactoring"),
        ("Update the README and fix typos in the guide", "documentation"),
        ("Optimize the hot path to cut allocations", "performance"),
        ("Set up the CI pipeline and the Docker build", "devops"),
        ("Add a REST API endpoint that returns one order", "api_endpoint"),
        ("Write a migration that adds an index to the orders table", "database"),
        ("Sanitize user input to prevent SQL injection and XSS", "security"),
        ("Split the billing microservice out of the monolith", "microservice"),
        ("Build a dropdown component for the settings page", "web_component"),
        ("Read the settings from environment variables with defaults", "configuration"),
        ("Parse the CSV export and aggregate revenue per region", "data_processing"),
    ],
)
def test_the_rules_name_each_type_with_confidence(text: str, expected: str) -> None:
    result = classify(text, semantic=False)
    assert (result.type, result.method) == (expected, "rules")
    assert 0.5 <= result.confidence <= 1.0


def test_two_kinds_of_work_in_one_description_are_less_sure_than_one() -> None:
    one = classify("Add unit tests for the parser", semantic=False)
    two = classify("Add unit tests for the parser and optimize its memory use", semantic=False)
    assert two.confidence < one.confidence


def test_nothing_recognisable_is_general() -> None:
    result = classify("Make it nicer", semantic=False)
    assert (result.type, result.method) == (GENERAL, "fallback")


def test_the_types_considered_can_be_limited() -> None:
    result = classify(
        "Add a REST endpoint with tests", among=["api_endpoint", "documentation"], semantic=False
    )
    assert result.type == "api_endpoint" and {name for name, _ in result.scores} == {
        "api_endpoint",
        "documentation",
    }


@needs_semantic
def test_when_no_rule_is_sure_the_nearest_prototypes_decide() -> None:
    text = "The checkout feels sluggish on old laptops"
    assert classify(text, semantic=False).type == GENERAL
    result = classify(text)
    assert (result.type, result.method) == ("performance", "prototypes")
    assert 0.5 <= result.confidence <= 0.8


@pytest.mark.parametrize(
    ("text", "language", "message"),
    [
        ("", None, "the task description is empty"),
        ("   ", None, "the task description is empty"),
        ("x" * (MAX_CHARS + 1), None, "at most 20,000"),
        ("Add tests", "cobol", "unknown language 'cobol'"),
    ],
)
def test_bad_input_is_named(text: str, language: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        classify(text, language)


def baton(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120)


def test_the_command_classifies_one_task_and_a_batch(tmp_path: Path) -> None:
    one = baton("classify", "Create a NATS consumer for user events", "--language", "elixir", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["type"] == "nats_consumer"
    batch = tmp_path / "tasks.jsonl"
    batch.write_text(
        '"Add unit tests for the parser"\n\n{"text": "Fix the crash on empty input", "language": "go"}\n'
    )
    many = baton("classify", "--file", str(batch), "--json", "--no-semantic")
    assert many.returncode == 0, many.stderr
    lines = [json.loads(line) for line in many.stdout.splitlines()]
    assert [(d["text"], d["type"]) for d in lines] == [
        ("Add unit tests for the parser", "testing"),
        ("Fix the crash on empty input", "bugfix"),
    ]
    table = baton("classify", "--file", str(batch), "--no-semantic")
    assert table.returncode == 0 and "testing" in table.stdout and "bugfix" in table.stdout


def test_the_command_names_bad_input_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"Add tests"\n{"text": "x", "language": "cobol"}\n')
    cases = [
        (("classify",), "give a task description or --file"),
        (("classify", ""), "the task description is empty"),
        (("classify", "--file", str(bad)), "line 2: unknown language 'cobol'"),
        (("classify", "--file", str(tmp_path / "none.jsonl")), "does not exist"),
        (("classify", "Add tests", "--among", "testing,nope"), "unknown task type"),
    ]
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    cases.append((("classify", "--file", str(tmp_path / "junk.jsonl")), "line 1: not JSON"))
    for args, message in cases:
        done = baton(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
