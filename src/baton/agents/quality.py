"""The quality of a sub-task's result, 0 to 1: what template selection learns from besides
success.

Validators come first: a sub-task that failed scores 0, one whose validators passed starts
at 0.6, one without validators at 0.4 (it passed no check). The rest is a heuristic read
of the answer, documented here so that its scores can be argued with:

- **structure** (0.15): code that defines something (a function, a class, a module, a
  test); prose in paragraphs, a list or sections;
- **error handling** (0.15): code that handles failure (try/except, rescue, catch,
  ``Result``/``?``, ``if err != nil``, raising or returning an error); for prose, which
  has none to handle, the full share;
- **a reasonable length** (0.1): at least 20 characters and at most 20,000.
"""

from __future__ import annotations

import re
from typing import Any

PASSED, UNCHECKED = 0.6, 0.4
STRUCTURE, ERRORS, LENGTH = 0.15, 0.15, 0.1
SHORTEST, LONGEST = 20, 20_000

_DEFINES = re.compile(
    r"^\s*(?:def |async def |class |fn |pub fn |func |function |export |defmodule |def\w* |"
    r"CREATE |ALTER |test\(|it\(|describe\(|impl |struct |interface |module )",
    re.M | re.I,
)
_HANDLES = re.compile(
    r"\b(?:try|except|rescue|catch|raise|throw|Result<|Err\(|err != nil|\{:error|on_error|ROLLBACK)\b|\?;",
    re.I,
)
_SHAPED = re.compile(r"\n\s*\n|^\s*(?:[-*] |\d+[.)] |#+ )", re.M)


def quality(output: Any, *, succeeded: bool, checked: bool, extract: str = "text") -> float:
    """The score of one sub-task's output (``checked``: it had validators, and they passed)."""
    if not succeeded:
        return 0.0
    score = PASSED if checked else UNCHECKED
    text = output.get("text") if isinstance(output, dict) else output
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if extract == "code":
        score += STRUCTURE if _DEFINES.search(text) else 0.0
        score += ERRORS if _HANDLES.search(text) else 0.0
    else:
        score += STRUCTURE if _SHAPED.search(text) else 0.0
        score += ERRORS
    score += LENGTH if SHORTEST <= len(text.strip()) <= LONGEST else 0.0
    return round(min(score, 1.0), 4)


__all__ = ["quality"]
