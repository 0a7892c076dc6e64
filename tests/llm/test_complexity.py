"""The gateway's estimate of a request's complexity: what it reads, and how often it
agrees with labels it was not written against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.llm.complexity import LEVELS, estimate
from baton.llm.types import ChatRequest, Message

HELD_OUT = Path(__file__).with_name("data") / "complexity_heldout.jsonl"


def level(prompt: str, max_tokens: int | None = None) -> str:
    return estimate(ChatRequest((Message("user", prompt),), max_tokens=max_tokens)).level


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Is this message about a data breach? Answer yes or no: 'we were hacked today'", "simple"),
        ("Which of these is the capital of Peru: Lima, Quito or Bogota? Just the name.", "simple"),
        ("Explain what a write-ahead log is in two sentences.", "medium"),
        ("Write a SQL query that counts orders per day.", "medium"),
        ("Design a sharding scheme for our 40 TB Postgres.", "complex"),
        ("Compare three queues for our pipeline and recommend one.", "complex"),
        ("Our checkout has been down since the deploy an hour ago. Roll back or fix forward?", "crisis"),
        ("Write a detailed analysis, with sources and the risks, of moving to a four-day week.", "crisis"),
    ],
)
def test_the_work_the_bound_and_the_stakes_set_the_level(prompt: str, expected: str) -> None:
    assert level(prompt) == expected


def test_a_bound_on_the_answer_caps_the_level_whatever_the_topic() -> None:
    urgent = "Ransomware hit our hospital tonight: what should we do? "
    assert level(urgent) == "crisis"
    assert level(urgent + "Reply with a single word.") == "simple"
    assert level(urgent + "Answer in two sentences.") == "medium"
    assert level(urgent, max_tokens=16) == "simple"  # a small max_tokens is a bound too


def test_a_long_input_needs_at_least_a_medium_model() -> None:
    document = "The quarterly numbers moved in several directions at once. " * 400
    assert level("Translate to French?") == "medium"
    assert level("Which language is this? " + document) == "medium"


def test_the_estimate_says_why() -> None:
    reasons = estimate(ChatRequest((Message("user", "Prove that sqrt(2) is irrational."),))).reasons
    assert reasons == ("asks for prove",)


def test_on_held_out_requests_it_agrees_more_often_than_not() -> None:
    """The second half of a set written by someone who had not seen the estimator, which
    was adjusted on the first half only: what bench/README reports (0.67 agreeing)."""
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) == 120 and {r["level"] for r in rows} == set(LEVELS)
    held_out = rows[60:]
    agreeing = sum(level(r["prompt"]) == r["level"] for r in held_out) / len(held_out)
    assert agreeing >= 0.6
