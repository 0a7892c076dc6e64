"""Structured logs: JSON lines on stderr when it is not a terminal, readable lines when it is.

Every line carries the ids of what it is about: an attempt's ``run_id``, ``step_id`` and
``attempt`` (bound by the executor while the attempt runs, so a task's own structlog calls
carry them too), and a request's ``correlation_id`` where an interface binds one.
"""

from __future__ import annotations

import sys
from typing import Any

import structlog

from baton.secrets import Redactor


def configure(json_lines: bool | None = None) -> None:
    """Set up structlog for a baton process (``json_lines`` None: JSON unless stderr is a tty)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    redactor = Redactor.from_environ()

    def redact(_: Any, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        """The process's secrets never reach a log line."""
        return {k: redactor.redact(v) if isinstance(v, str) else v for k, v in event.items()}

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
            *([redact] if redactor else []),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


__all__ = ["configure"]
