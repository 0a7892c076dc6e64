"""A run's events as the store records them, for streams that resume (SSE ``Last-Event-ID``).

The store is the truth about a run, whichever worker on whichever machine executed it: its
row and its steps' rows and attempts carry the time of every transition, and the audit
trail when the run was paused and resumed, by whom. This reads them back as the engine's
events (same kinds, same data), each with an id that orders them:
``<microseconds>-<phase>-<step index>-<attempt>``. A client that reconnects with the last
id it saw gets what came after it, then the live ones, with nothing written on the
executor's path to make that possible.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from baton.engine import Event
from baton.status import StepStatus
from baton.store import AttemptRecord, AuditEntry, RunRecord, StepRecord

_ID = re.compile(r"^(\d{1,20})-(\d)-(\d{1,15})-(\d{1,9})$")
# Phases order what happens at the same instant: a run starts before its steps, a step
# starts before it finishes, the run ends last. A pause or a resume (phase 5, numbered by
# its audit entry) is alone at its instant.
_RUN_PENDING, _RUN_RUNNING, _STEP_START, _STEP_END, _RUN_END, _CONTROL = range(6)
#: audit actions that are run transitions, and the events they were
CONTROL_EVENTS = {"run.pause": "run.paused", "run.resume": "run.resumed"}
Key = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Stamped:
    key: Key
    event: Event

    @property
    def id(self) -> str:
        return "-".join(str(part) for part in self.key)


def parse_id(text: str) -> Key | None:
    """The order key of an event id, or None when it is not one."""
    match = _ID.match(text.strip())
    if match is None:
        return None
    us, phase, idx, attempt = (int(g) for g in match.groups())
    return us, phase, idx, attempt


def _us(ts: float) -> int:
    return round(ts * 1_000_000)


def history(
    run: RunRecord,
    steps: list[StepRecord],
    attempts: list[AttemptRecord],
    audit: list[AuditEntry],
) -> list[Stamped]:
    """Every event of the run the store can tell, in order (``audit``: the run's entries
    on the audit trail, for its pauses and resumes)."""
    out: list[Stamped] = []

    def add(ts: float | None, phase: int, idx: int, attempt: int, event: Event) -> None:
        if ts is not None:
            out.append(Stamped((_us(ts), phase, idx, attempt), event))

    add(
        run.created_at,
        _RUN_PENDING,
        0,
        0,
        Event("run.pending", run.id, None, {"name": run.name}, run.created_at),
    )
    add(run.started_at, _RUN_RUNNING, 0, 0, Event("run.running", run.id, None, {}, run.started_at or 0.0))
    index = {s.step_id: s.idx for s in steps}
    tried: dict[str, list[AttemptRecord]] = defaultdict(list)
    for a in attempts:
        tried[a.step_id].append(a)
    for step in steps:
        recorded = sorted(tried.get(step.step_id, []), key=lambda a: a.attempt)
        last = max((a.attempt for a in recorded), default=0)
        for a in recorded:
            add(
                a.started_at,
                _STEP_START,
                step.idx,
                a.attempt,
                Event("step.running", run.id, step.step_id, {"attempt": a.attempt}, a.started_at or 0.0),
            )
            kind = {"timeout": "failed"}.get(a.status, a.status)
            if kind == "failed" and (a.attempt < last or step.status is StepStatus.RETRYING):
                kind = "retrying"
            data: dict[str, object] = {"attempt": a.attempt}
            if a.started_at is not None and a.finished_at is not None:
                data["duration_s"] = a.finished_at - a.started_at
            if a.error:
                data["error"] = a.error
            add(
                a.finished_at,
                _STEP_END,
                step.idx,
                a.attempt,
                Event(f"step.{kind}", run.id, step.step_id, data, a.finished_at or 0.0),
            )
        if step.status is StepStatus.RUNNING and step.attempt > last:
            add(
                step.started_at,
                _STEP_START,
                step.idx,
                step.attempt,
                Event(
                    "step.running", run.id, step.step_id, {"attempt": step.attempt}, step.started_at or 0.0
                ),
            )
        elif (
            step.status in (StepStatus.SKIPPED, StepStatus.CANCELLED)
            and step.attempt <= last
            and not any(a.attempt == step.attempt and a.status == "cancelled" for a in recorded)
        ):
            data = {"error": step.error} if step.error else {}
            add(
                step.finished_at,
                _STEP_END,
                step.idx,
                step.attempt + 1,
                Event(f"step.{step.status.value}", run.id, step.step_id, data, step.finished_at or 0.0),
            )
    for entry in audit:
        control = CONTROL_EVENTS.get(entry.action)
        if control is not None:
            event = Event(control, run.id, None, {"by": entry.actor}, entry.ts)
            add(entry.ts, _CONTROL, entry.seq, 0, event)
    if run.status.terminal:
        data = {"error": run.error} if run.error else {}
        add(
            run.finished_at,
            _RUN_END,
            len(index),
            0,
            Event(f"run.{run.status.value}", run.id, None, data, run.finished_at or 0.0),
        )
    out.sort(key=lambda s: s.key)
    return out


__all__ = ["Stamped", "history", "parse_id"]
