"""From a validated plan to the numbers the scheduler and `baton validate` use."""

from __future__ import annotations

import statistics

from baton.plan.dag import Dag
from baton.plan.model import Plan, Step
from baton.tasks.registry import Registry


def step_estimates(steps: list[Step], registry: Registry) -> list[float]:
    """Expected seconds per step: the step's ``estimate_s``, else the task's estimate.

    Steps with no estimate weigh the median of the known ones (1.0 when none is known),
    so that critical-path-first ordering still counts them.
    """
    estimators = {name: registry.get(name).estimate for name in {s.task for s in steps} if name in registry}
    known: list[float | None] = []
    for step in steps:
        guess = step.estimate_s
        if guess is None:
            estimate = estimators.get(step.task)
            if estimate is not None:
                try:
                    guess = estimate(step.inputs)
                except Exception:  # an estimator must never break planning
                    guess = None
        known.append(guess)
    values = [v for v in known if v is not None]
    default = statistics.median(values) if values else 1.0
    return [default if v is None else v for v in known]


def analyze(plan: Plan, registry: Registry) -> Dag:
    """The plan's DAG with critical-path weights (call after validation)."""
    index = {s.id: i for i, s in enumerate(plan.steps)}
    needs = [[index[n] for n in s.needs] if s.needs else [] for s in plan.steps]
    return Dag.build([s.id for s in plan.steps], needs, step_estimates(plan.steps, registry))
