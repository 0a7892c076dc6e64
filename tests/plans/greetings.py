"""A user task module, registered by `baton run --import greetings` (see tests/test_cli.py)."""

from __future__ import annotations

import baton


@baton.task(name="greetings.hello")
def hello(name: str) -> str:
    """Greet someone."""
    return f"hello, {name}"
