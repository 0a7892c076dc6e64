"""The engine: facade, executor and event stream."""

from baton.engine.engine import Engine, RunHandle
from baton.engine.events import Event, EventBus

__all__ = ["Engine", "Event", "EventBus", "RunHandle"]
