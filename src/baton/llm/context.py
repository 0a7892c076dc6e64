"""Dependency context: what a model step is told of the steps it needs.

At most ``limit`` of them (3 by default), the most relevant first: relevance is how many
of the prompt's content words a need's output (and its step id) shares, so the output
that talks about what the prompt asks comes before a log line; ties keep the order of
``needs``. Outputs the prompt already quotes (through a reference) are not repeated.
What is chosen shares a token budget: an output over its share is cut in the middle,
keeping its beginning and its end, and says how much was cut.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from baton.llm import tokens

DEFAULT_LIMIT = 3
DEFAULT_TOKENS = 1500
_WORD = re.compile(r"[a-z0-9]{3,}")
_SKIP = frozenset(
    re.split(
        r"\s+",
        "the and for are but not you your with this that from have has was were will what when "
        "which who how why can all any its into out use using used one two also than then them "
        "they their there these those each only more most some such very just should would could "
        "answer step steps output outputs write return given below above",
    )
)


@dataclass(frozen=True, slots=True)
class Piece:
    step_id: str
    text: str
    score: float


def render(output: Any) -> str:
    """An output as text: a model step's answer, a string as it is, anything else as JSON."""
    text = output.get("text") if isinstance(output, dict) else None
    if isinstance(text, str):
        return text
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False, sort_keys=True, default=str)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _SKIP}


def rank(outputs: dict[str, Any], prompt: str) -> list[Piece]:
    """Every need with an output the prompt does not already hold, most relevant first."""
    wanted = _words(prompt)
    pieces: list[Piece] = []
    for position, (step_id, output) in enumerate(outputs.items()):
        if output is None:
            continue
        text = render(output).strip()
        if not text or text in prompt:
            continue
        shared = len(wanted & (_words(text) | _words(step_id.replace("_", " ").replace("-", " "))))
        pieces.append(Piece(step_id, text, shared - position * 1e-6))  # ties: order of needs
    return sorted(pieces, key=lambda p: -p.score)


def shorten(text: str, budget: int) -> str:
    """``text`` within ``budget`` tokens: its beginning and its end, the middle cut."""
    encoding = tokens.encoding()
    ids = encoding.encode(text, disallowed_special=())
    if len(ids) <= budget:
        return text
    keep = max(budget - 12, 8)
    head, tail = ids[: keep * 2 // 3], ids[len(ids) - keep // 3 :]
    cut = len(ids) - len(head) - len(tail)
    return f"{encoding.decode(head)}\n[... {cut} tokens cut ...]\n{encoding.decode(tail)}"


def needs_context(
    outputs: dict[str, Any], prompt: str, *, limit: int = DEFAULT_LIMIT, max_tokens: int = DEFAULT_TOKENS
) -> tuple[str, list[str]]:
    """The context block for ``prompt`` (empty when there is nothing to add), and the steps
    it quotes."""
    chosen = rank(outputs, prompt)[: max(0, limit)]
    if not chosen:
        return "", []
    share = max(max_tokens // len(chosen), 16)
    parts = [f"## {p.step_id}\n{shorten(p.text, share)}" for p in chosen]
    return "Results of the steps this one builds on:\n\n" + "\n\n".join(parts), [p.step_id for p in chosen]


__all__ = ["DEFAULT_LIMIT", "DEFAULT_TOKENS", "needs_context", "rank", "render", "shorten"]
