"""Where sync tasks run: threads that never hold the process.

A thread cannot be stopped from outside. A sync task that overruns its timeout, or is
cancelled, goes on in its thread until it returns on its own; asyncio's default executor
would then keep the process from exiting (``asyncio.run`` and the interpreter both join its
threads: a worker given SIGTERM waited 21 minutes for two sleeping ones). These threads are
daemons, reused while there is work, and gone after a minute idle; a call whose waiter gave
up is *abandoned*, and counted, so a worker can say how many it left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: an idle thread ends after this long without work
IDLE_S = 60.0


@dataclass(slots=True, eq=False)
class _Call:
    context: contextvars.Context
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class SyncThreads:
    """A pool of daemon threads for sync handlers: ``await threads.run(fn, kwargs)``."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work, not yet promised to a caller
        self._running: set[_Call] = set()

    async def run(self, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        """Call ``fn(**kwargs)`` in a thread with the caller's context variables; cancelling
        the caller abandons the call (its thread finishes it, nobody waits)."""
        loop = asyncio.get_running_loop()
        call = _Call(contextvars.copy_context(), fn, kwargs, loop, loop.create_future())
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that thread is this call's
        self._queue.put(call)
        if spawn:
            threading.Thread(target=self._serve, name="baton-sync-task", daemon=True).start()
        return await call.future

    @property
    def abandoned(self) -> int:
        """Calls still running in a thread that nobody waits for any more."""
        with self._lock:
            return sum(1 for call in self._running if call.future.done())

    def _serve(self) -> None:
        while True:
            try:
                call = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not promised to anyone: this thread can go
                        self._idle -= 1
                        return
                continue  # a call was promised to a waiting thread and is on its way
            with self._lock:
                self._running.add(call)
            try:
                value = call.context.run(call.fn, **call.kwargs)
            except BaseException as exc:  # SystemExit too: the task's, not this thread's
                self._settle(call, None, exc)
            else:
                self._settle(call, value, None)
            with self._lock:
                self._running.discard(call)
                self._idle += 1

    @staticmethod
    def _settle(call: _Call, value: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if call.future.done():  # abandoned: its waiter was cancelled
                return
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            call.loop.call_soon_threadsafe(settle)


#: the one pool of the process (as asyncio's default executor is one per loop)
sync_threads = SyncThreads()

__all__ = ["SyncThreads", "sync_threads"]
