"""The server's secrets never reach what it stores or logs.

A step can come across a secret of the process that runs it (a task reads ``os.environ``;
a model echoes the key it was given; an error message quotes a URL with a token), and
whatever a step outputs is readable by every viewer key. So the values of the process's
secrets are replaced by ``[redacted:NAME]`` in step outputs, errors and attempt details
before they are stored, and in log lines before they are written.

A secret is the value of an environment variable whose name ends in ``_KEY``, ``_TOKEN``
or ``_SECRET``, or contains ``PASSWORD`` (``OPENAI_API_KEY``, ``DB_PASSWORD``...), and any
value a caller adds (the LLM config's keys). Values shorter than 8 characters are not
secrets worth the name and would redact ordinary words.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

_NAMES = re.compile(r"(_KEY|_TOKEN|_SECRET)$|PASSWORD", re.IGNORECASE)
MIN_LENGTH = 8


class Redactor:
    """Replaces known secret values in text: ``redactor.redact(text)``."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._names: dict[str, str] = {}
        for name, value in secrets.items():
            if len(value) >= MIN_LENGTH:
                self._names[value] = name
                escaped = json.dumps(value)[1:-1]  # as it reads inside JSON text
                if escaped != value:
                    self._names[escaped] = name
        # longest first, so a secret containing another is replaced whole
        ordered = sorted(self._names, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> Redactor:
        """The secrets of this process's environment, and the variables named in ``extra``."""
        env = os.environ if environ is None else environ
        wanted = {name for name in env if _NAMES.search(name)} | {n for n in extra if n in env}
        return cls({name: env[name] for name in wanted})

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f"[redacted:{self._names[m.group(0)]}]", text)

    def redact_value(self, value: Any) -> Any:
        """A copy of ``value`` (JSON-like) with secrets redacted in its strings."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact_value(k): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_value(v) for v in value]
        return value


__all__ = ["MIN_LENGTH", "Redactor"]
