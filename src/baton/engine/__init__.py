"""The engine: facade, executor and event stream."""

from baton.engine.engine import DEFAULT_LEASE_S, Engine, RunHandle
from baton.engine.events import Event, EventBus

__all__ = ["DEFAULT_LEASE_S", "Engine", "Event", "EventBus", "RunHandle"]
