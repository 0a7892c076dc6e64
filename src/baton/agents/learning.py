"""Template statistics from recorded outcomes, and the choice among candidates.

A goal's outcome is the roll-up of its sub-tasks' (all succeeded; their mean quality;
their time and cost summed), and its reward is success times quality, between 0 and 1. Per
template and per cell of the fallback chain (task type and language; task type, any
language; anything), the statistics are:

- uses, and the reward, time, quality and cost as exponential moving averages (alpha 0.3)
  in the order the goals ended;
- discounted counts: each goal weighs half as much per ``HALF_LIFE_GOALS`` (50) goals of
  the same cell that ended after it, and per ``HALF_LIFE_S`` (30 days) of age, so what a
  template did lately counts more than what it did long ago, at any volume: a template
  that stopped working loses its standing within a few dozen goals.

Selection is a discounted Thompson draw: each candidate's success is Beta(1 + rewards,
1 + misses) over its own cell's discounted counts, on a prior borrowed from its parent
cell (at most ``BORROW`` pseudo-goals of the template's record there) so that a sparse
cell starts from what the template did for the same kind of task elsewhere, and on a
prior that expects more of a template the more specific it is. The highest
draw wins. The draw is seeded (the goal's own seed) and recorded with the goal, so a
recovered goal never draws again.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from baton.agents.templates import Cell, Template
from baton.store.base import OutcomeRecord

ALPHA = 0.3
HALF_LIFE_S = 30 * 24 * 3600.0
HALF_LIFE_GOALS = 50.0
#: the most pseudo-goals a cell borrows from its parent
BORROW = 4.0
#: draws of the posterior for intervals and the chance of being best (seeded: reports repeat)
DRAWS = 4000
#: the prior of a template by its place on the fallback chain, before any outcome: means
#: 0.67 (written for the task and its language), 0.6 (for the task), 0.5 (universal)
LEVEL_PRIOR = {"specific": (2.0, 1.0), "language-generic": (1.5, 1.0), "universal": (1.0, 1.0)}
#: the cell of every goal, whatever its task
ANY = Cell("*", None)


@dataclass(frozen=True, slots=True)
class GoalOutcome:
    """One goal's sub-task outcomes rolled up."""

    run_id: str
    template_id: str
    task_type: str
    language: str | None
    success: bool
    quality: float
    time_s: float
    cost_usd: float
    ended_at: float
    #: a model did some of its work: a goal answered wholly by rules and caches says
    #: nothing new of its template, and is left out of what is learned
    informative: bool = True

    @property
    def reward(self) -> float:
        return self.quality if self.success else 0.0


def roll_up(outcomes: Iterable[OutcomeRecord]) -> list[GoalOutcome]:
    """Outcomes per sub-task, as one per goal, in the order the goals ended."""
    by_run: dict[str, list[OutcomeRecord]] = defaultdict(list)
    for o in outcomes:
        by_run[o.run_id].append(o)
    goals = []
    for run_id, parts in by_run.items():
        first = parts[0]
        goals.append(
            GoalOutcome(
                run_id=run_id,
                template_id=first.template_id,
                task_type=first.task_type,
                language=first.language,
                success=all(p.success for p in parts),
                quality=math.fsum(p.quality for p in parts) / len(parts),
                time_s=math.fsum(p.time_s for p in parts),
                cost_usd=math.fsum(p.cost_usd for p in parts),
                ended_at=max(p.recorded_at for p in parts),
                informative=any(p.method not in ("cached", "autonomous") for p in parts),
            )
        )
    return sorted(goals, key=lambda g: (g.ended_at, g.run_id))


@dataclass(slots=True)
class Stats:
    """What one template did in one cell."""

    uses: int = 0
    successes: int = 0
    #: discounted goals, and discounted rewards among them
    weight: float = 0.0
    reward: float = 0.0
    ema_reward: float | None = None
    ema_quality: float | None = None
    ema_time_s: float | None = None
    ema_cost_usd: float | None = None
    last_at: float | None = None

    def add(self, goal: GoalOutcome, decay: float) -> None:
        self.uses += 1
        self.successes += goal.success
        self.weight += decay
        self.reward += decay * goal.reward
        self.ema_reward = _ema(self.ema_reward, goal.reward)
        self.ema_quality = _ema(self.ema_quality, goal.quality)
        self.ema_time_s = _ema(self.ema_time_s, goal.time_s)
        self.ema_cost_usd = _ema(self.ema_cost_usd, goal.cost_usd)
        self.last_at = goal.ended_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "uses": self.uses,
            "successes": self.successes,
            "discounted_uses": round(self.weight, 3),
            "ema_reward": _round(self.ema_reward),
            "ema_quality": _round(self.ema_quality),
            "ema_time_s": _round(self.ema_time_s),
            "ema_cost_usd": _round(self.ema_cost_usd, 8),
            "last_at": self.last_at,
        }


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else ALPHA * value + (1 - ALPHA) * previous


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True, slots=True)
class Posterior:
    a: float
    b: float

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)


@dataclass(slots=True)
class Knowledge:
    """Every template's statistics per cell (``str(Cell)``), from the outcomes given."""

    cells: dict[str, dict[str, Stats]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        goals: Sequence[GoalOutcome],
        now: float,
        half_life_s: float = HALF_LIFE_S,
        half_life_goals: float = HALF_LIFE_GOALS,
    ) -> Knowledge:
        """From goals in the order they ended."""
        known = cls()
        later: dict[str, int] = defaultdict(int)  # goals of each cell that ended after this one
        weighted = []
        for goal in reversed([g for g in goals if g.informative]):
            # its own cell, the task type's for any language, and everything (each once)
            for cell in dict.fromkeys((Cell(goal.task_type, goal.language), Cell(goal.task_type, None), ANY)):
                key = str(cell)
                age = 0.5 ** (max(0.0, now - goal.ended_at) / half_life_s)
                weighted.append((key, goal, age * 0.5 ** (later[key] / half_life_goals)))
                later[key] += 1
        for key, goal, decay in reversed(weighted):  # oldest first, for the moving averages
            known.cells.setdefault(key, {}).setdefault(goal.template_id, Stats()).add(goal, decay)
        return known

    def stats(self, cell: Cell | str, template_id: str) -> Stats:
        return self.cells.get(str(cell), {}).get(template_id, Stats())

    def posterior(
        self, template_id: str, task_type: str, language: str | None, level: str = "universal"
    ) -> Posterior:
        """Beta over the template's reward in the goal's cell: on the prior of its ``level``
        (a template written for the task is expected to fit it better), plus what it did in
        the parent cell (language-generic, then anything) as at most BORROW pseudo-goals."""
        own_cell = Cell(task_type, language)
        parents = [Cell(task_type, None), ANY] if language is not None else [ANY]
        own = self.stats(own_cell, template_id)
        prior_a, prior_b = LEVEL_PRIOR.get(level, (1.0, 1.0))
        for parent in parents:
            borrowed = self.stats(parent, template_id)
            extra_weight = borrowed.weight - own.weight  # what the parent has beyond this cell
            if extra_weight > 1e-9:
                extra_reward = min(max(0.0, borrowed.reward - own.reward), extra_weight)
                k = min(BORROW, extra_weight)
                prior_a += k * extra_reward / extra_weight
                prior_b += k * (1.0 - extra_reward / extra_weight)
                break
        return Posterior(prior_a + own.reward, prior_b + (own.weight - own.reward))


@dataclass(frozen=True, slots=True)
class Choice:
    template: Template
    #: what the draw was: recorded with the goal
    record: dict[str, Any]


def choose(
    candidates: Sequence[Template],
    knowledge: Knowledge,
    task_type: str,
    language: str | None,
    seed: int,
) -> Choice:
    """A discounted Thompson draw among ``candidates`` (most specific first: ties go to it)."""
    if not candidates:
        raise ValueError("no candidate templates")
    rng = random.Random(seed)
    drawn = []
    for template in candidates:
        post = knowledge.posterior(template.id, task_type, language, template.level)
        drawn.append((rng.betavariate(post.a, post.b), template, post))
    best = max(range(len(drawn)), key=lambda i: (drawn[i][0], -i))
    record = {
        "seed": seed,
        "chosen": drawn[best][1].id,
        "candidates": [
            {"id": t.id, "level": t.level, "a": round(p.a, 4), "b": round(p.b, 4), "draw": round(d, 6)}
            for d, t, p in drawn
        ],
    }
    return Choice(drawn[best][1], record)


def interval(post: Posterior, seed: int = 0, level: float = 0.9) -> tuple[float, float]:
    """The central ``level`` interval of the posterior (from seeded draws)."""
    rng = random.Random(seed)
    draws = sorted(rng.betavariate(post.a, post.b) for _ in range(DRAWS))
    low = draws[int((1 - level) / 2 * DRAWS)]
    high = draws[min(DRAWS - 1, int((1 + level) / 2 * DRAWS))]
    return round(low, 4), round(high, 4)


def chance_best(posteriors: Sequence[Posterior], seed: int = 0) -> list[float]:
    """Each posterior's chance of being the highest (from seeded draws)."""
    rng = random.Random(seed)
    wins = [0] * len(posteriors)
    for _ in range(DRAWS):
        draws = [rng.betavariate(p.a, p.b) for p in posteriors]
        wins[max(range(len(draws)), key=draws.__getitem__)] += 1
    return [round(w / DRAWS, 4) for w in wins]


__all__ = [
    "ALPHA",
    "HALF_LIFE_GOALS",
    "HALF_LIFE_S",
    "Choice",
    "GoalOutcome",
    "Knowledge",
    "Posterior",
    "Stats",
    "chance_best",
    "choose",
    "interval",
    "roll_up",
]
