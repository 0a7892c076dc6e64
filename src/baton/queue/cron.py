"""Cron schedules: each tick becomes one job, however many schedulers run.

Every worker runs the scheduler on its sweep. A schedule fires by moving its ``next_at``
with a compare-and-set and inserting the ticks' jobs under a per-tick unique key, in one
transaction: of several schedulers that see the same due tick, exactly one moves the
schedule, and even a racing insert of the same tick finds the key taken. Ticks missed
while no scheduler ran fire only if they are at most ``catch_up_s`` late; older ones are
dropped, so coming back after downtime does not fire a burst.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from baton.store.base import NewJob, Schedule, Store

#: a tick is never dropped for being this late (the scheduler runs every sweep).
MIN_LATENESS_S = 5.0
#: at most this many missed ticks fire at once, whatever the catch-up window.
MAX_CATCH_UP_TICKS = 100


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a cron expression we accept, or None: one that never fires
    (``0 0 30 2 *``) is refused too, since its next tick cannot be set."""
    if not isinstance(expr, str) or not expr.strip():
        return "a cron expression is required, such as '*/5 * * * *'"
    fields = expr.split()
    if len(fields) not in (5, 6):
        return f"cron expression {expr!r} has {len(fields)} fields; it needs 5 (or 6 with seconds)"
    try:
        it = croniter(expr, datetime.fromtimestamp(time.time(), UTC))
    except (CroniterBadCronError, ValueError, KeyError) as exc:
        return f"cron expression {expr!r} is not valid: {exc}"
    try:
        it.get_next(float)
    except CroniterBadDateError:  # croniter looks a bounded number of years ahead
        return f"cron expression {expr!r} never fires: no date matches it"
    return None


def next_tick(expr: str, after: float) -> float:
    """The first tick of ``expr`` strictly after ``after`` (UTC)."""
    start = datetime.fromtimestamp(after, UTC)
    return float(croniter(expr, start).get_next(float))


def ticks(expr: str, start: float, end: float, limit: int = MAX_CATCH_UP_TICKS) -> list[float]:
    """Ticks in [start, end], oldest first (at most ``limit``, the latest ones)."""
    out: list[float] = []
    it = croniter(expr, datetime.fromtimestamp(start - 0.001, UTC))
    while True:
        t = float(it.get_next(float))
        if t > end:
            break
        if t >= start:
            out.append(t)
    return out[-limit:]


def tick_jobs(schedule: Schedule, due: list[float]) -> list[NewJob]:
    return [
        NewJob(
            task=schedule.task,
            args=dict(schedule.args),
            queue=schedule.queue,
            priority=schedule.priority,
            unique_key=f"cron:{schedule.name}:{t:.3f}",
            max_attempts=schedule.max_attempts,
            timeout_s=schedule.timeout_s,
        )
        for t in due
    ]


async def fire_due(store: Store, now: float | None = None) -> dict[str, int]:
    """Enqueue the due ticks of every schedule; how many jobs each schedule fired."""
    now = time.time() if now is None else now
    fired: dict[str, int] = {}
    for schedule in await store.list_schedules():
        if schedule.next_at > now:
            continue
        window = max(schedule.catch_up_s, MIN_LATENESS_S)
        due = ticks(schedule.cron, max(schedule.next_at, now - window), now)
        following = next_tick(schedule.cron, now)
        if await store.fire_schedule(
            schedule.name, schedule.next_at, following, tick_jobs(schedule, due), now
        ):
            fired[schedule.name] = len(due)
    return fired


def describe(schedule: Schedule) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "task": schedule.task,
        "cron": schedule.cron,
        "args": schedule.args,
        "queue": schedule.queue,
        "next_at": schedule.next_at,
        "catch_up_s": schedule.catch_up_s,
    }
