"""What the outcomes say of each template, per task and language: a ranking by posterior
mean with the counts and a 90% interval, and a recommendation only where the evidence
makes one (a template the best with at least 95% certainty, over at least
``MIN_USES`` goals of its own); "insufficient data" otherwise."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from baton.agents.learning import Knowledge, chance_best, interval, roll_up
from baton.agents.templates import Cell

if TYPE_CHECKING:
    from baton.agents.goals import Agents

SURE = 0.95
MIN_USES = 5


async def report(agents: Agents) -> dict[str, Any]:
    """The report of every cell where goals were recorded, most goals first."""
    from baton.agents.goals import HISTORY

    await agents.collect()
    goals = roll_up(await agents.engine.store.outcomes(limit=HISTORY))
    known = Knowledge.of(goals, time.time())
    cells: dict[Cell, dict[str, int]] = {}
    for goal in goals:
        used = cells.setdefault(Cell(goal.task_type, goal.language), {})
        used[goal.template_id] = used.get(goal.template_id, 0) + 1
    out = []
    for cell, used in sorted(cells.items(), key=lambda c: (-sum(c[1].values()), str(c[0]))):
        rows = []
        posteriors = []
        for template_id in used:
            template = agents.library.templates.get(template_id)
            level = template.level if template is not None else "universal"
            post = known.posterior(template_id, cell.task_type, cell.language, level)
            stats = known.stats(cell, template_id)
            posteriors.append(post)
            rows.append(
                {
                    "id": template_id,
                    "level": level,
                    "mean": round(post.mean, 4),
                    "interval": interval(post),
                    **stats.to_dict(),
                }
            )
        for row, chance in zip(rows, chance_best(posteriors), strict=True):
            row["chance_best"] = chance
        rows.sort(key=lambda r: -r["mean"])
        out.append(
            {
                "cell": str(cell),
                "goals": sum(used.values()),
                "templates": rows,
                "recommendation": _recommend(rows),
            }
        )
    return {"cells": out, "sure_at": SURE, "min_uses": MIN_USES}


def _recommend(rows: list[dict[str, Any]]) -> str:
    if len(rows) < 2:
        return f"insufficient data: only {rows[0]['id']} has been tried here"
    best = max(rows, key=lambda r: r["chance_best"])
    if best["chance_best"] >= SURE and best["uses"] >= MIN_USES:
        others = ", ".join(r["id"] for r in rows if r is not best)
        return (
            f"use {best['id']} more (the best with probability {best['chance_best']:.2f} "
            f"over {best['uses']} goals); use {others} less"
        )
    return f"insufficient data: no template is the best with probability {SURE} over {MIN_USES}+ goals yet"


__all__ = ["report"]
