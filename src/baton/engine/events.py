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
    """Synchronous fan-out to subscribers; a failing subscriber is logged, never fatal.

    A subscriber may take only the events whose kind starts with a prefix (``"run."``):
    step events are built only while a subscriber wants them (``active``), so one that
    follows runs only costs the executor nothing per step.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, str]] = []
        self.active = False

    def subscribe(self, fn: Subscriber, prefix: str = "") -> Callable[[], None]:
        """Add a subscriber (of the kinds starting with ``prefix``); returns a function
        that removes it."""
        entry = (fn, prefix)
        self._subscribers.append(entry)
        self._refresh()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._refresh()

        return unsubscribe

    def _refresh(self) -> None:
        self.active = any("step.".startswith(prefix) for _, prefix in self._subscribers)

    def emit(self, event: Event) -> None:
        for fn, prefix in list(self._subscribers):
            if prefix and not event.kind.startswith(prefix):
                continue
            try:
                fn(event)
            except Exception:
                log.exception("event subscriber failed", subscriber=repr(fn), kind=event.kind)
