"""Getting the useful part out of a model's answer."""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(text: str, language: str | None = None) -> str:
    """The code in a markdown-fenced answer.

    The first fenced block tagged with ``language`` when given, else the first fenced
    block, else the whole answer (models sometimes answer with bare code).
    """
    blocks = _FENCE.findall(text)
    if language:
        wanted = language.lower()
        for tag, body in blocks:
            if tag.lower() == wanted:
                return str(body).rstrip() + "\n"
    if blocks:
        return str(blocks[0][1]).rstrip() + "\n"
    return text.strip() + "\n" if text.strip() else ""
