"""The one event stream: committed facts about runs and steps.

Events are emitted after the store committed what they report, so a subscriber never sees
something that a crash could take back. Progress displays, metrics, audit, SSE and NATS
all subscribe here instead of being called from the executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("baton.events")


@dataclass(frozen=True, slots=True)
class Event:
    """``kind`` is ``run.<status>`` or ``step.<status>``; ``data`` holds details."""

    kind: str
    run_id: str
    step_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out to subscribers; a failing subscriber is logged, never fatal."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:
                log.exception("event subscriber failed", subscriber=repr(fn), kind=event.kind)
