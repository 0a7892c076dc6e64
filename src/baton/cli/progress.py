"""Live progress of a run: per-wave counts kept current from engine events."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from baton.engine import Event
from baton.status import RunStatus, StepStatus
from baton.store import RunRecord, StepRecord

WAVES_SHOWN = 12

STATUS_STYLE = {
    "completed": "green",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "paused": "yellow",
    "skipped": "dim",
    "running": "cyan",
    "retrying": "yellow",
}


def human_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


# -------------------------------------------------------------------------------------------

_DONE, _RUNNING, _FAILED, _SKIPPED, _WAITING = range(5)
_BUCKET = {
    StepStatus.SUCCEEDED: _DONE,
    StepStatus.RUNNING: _RUNNING,
    StepStatus.RETRYING: _RUNNING,
    StepStatus.FAILED: _FAILED,
    StepStatus.SKIPPED: _SKIPPED,
    StepStatus.CANCELLED: _SKIPPED,
    StepStatus.PENDING: _WAITING,
    StepStatus.READY: _WAITING,
}


@dataclass(slots=True)
class Progress:
    """Per-wave step counts of one run, kept current from engine events (O(1) per event)."""

    run_id: str
    name: str
    state: dict[str, StepStatus]
    wave_of: dict[str, int]
    counts: list[list[int]]
    totals: list[int]
    status: str = "running"
    retries: int = 0
    finished_here: int = 0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, run: RunRecord, steps: list[StepRecord]) -> Progress:
        waves = max((s.wave for s in steps), default=0) + 1
        counts = [[0] * 5 for _ in range(waves)]
        totals = [0] * waves
        for s in steps:
            counts[s.wave][_BUCKET[s.status]] += 1
            totals[s.wave] += 1
        return cls(
            run_id=run.id,
            name=run.name,
            state={s.step_id: s.status for s in steps},
            wave_of={s.step_id: s.wave for s in steps},
            counts=counts,
            totals=totals,
        )

    def on_event(self, event: Event) -> None:
        """Engine subscriber: must never raise (the bus would log to the user's terminal)."""
        if event.run_id != self.run_id:
            return
        kind, _, what = event.kind.partition(".")
        if kind == "run" and what in RunStatus.__members__.values():
            self.status = what
            return
        if kind != "step" or event.step_id not in self.state:
            return
        try:
            new = StepStatus(what)
        except ValueError:
            return
        old = self.state[event.step_id]
        self.state[event.step_id] = new
        if new is StepStatus.RETRYING:
            self.retries += 1
        if new.terminal and not old.terminal:
            self.finished_here += 1
        row = self.counts[self.wave_of[event.step_id]]
        row[_BUCKET[old]] -= 1
        row[_BUCKET[new]] += 1

    def render(self) -> RenderableType:
        total = sum(self.totals)
        done = sum(r[_DONE] for r in self.counts)
        running = sum(r[_RUNNING] for r in self.counts)
        failed = sum(r[_FAILED] for r in self.counts)
        finished = done + failed + sum(r[_SKIPPED] for r in self.counts)
        elapsed = time.monotonic() - self.started
        eta = "—"
        if self.finished_here and finished < total:
            eta = human_s((total - finished) * elapsed / self.finished_here)
        head = Text.assemble(("run ", "bold"), (self.run_id, "bold"), f" {self.name}  ", styled(self.status))
        stats = Text.assemble(
            f"{done}/{total} done · {running} running · ",
            (f"{failed} failed", "red" if failed else ""),
            f" · {self.retries} retries · elapsed {human_s(elapsed)} · ETA {eta}",
        )
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in ("wave", "progress", "done", "running", "failed", "skipped", "steps"):
            table.add_column(name, justify="left" if name == "progress" else "right")
        shown: Sequence[int] = range(len(self.totals))
        note = ""
        if len(self.totals) > WAVES_SHOWN:  # long chains: the unfinished waves, first ones first
            active = [w for w, row in enumerate(self.counts) if row[_RUNNING] or row[_WAITING]]
            shown = active[:WAVES_SHOWN]
            note = f"{len(self.totals) - len(active)} waves finished"
            if len(active) > WAVES_SHOWN:
                note += f", {len(active) - WAVES_SHOWN} more waiting"
        for w in shown:
            row = self.counts[w]
            table.add_row(
                str(w),
                ProgressBar(
                    total=self.totals[w], completed=self.totals[w] - row[_RUNNING] - row[_WAITING], width=24
                ),
                str(row[_DONE]),
                str(row[_RUNNING]),
                Text(str(row[_FAILED]), style="red" if row[_FAILED] else ""),
                str(row[_SKIPPED]),
                str(self.totals[w]),
            )
        parts: list[RenderableType] = [head, stats, table]
        if note:
            parts.append(Text(note, style="dim"))
        return Group(*parts)
