"""Workflow intents that need no model: ``aggregate``, ``transform`` and ``filter``.

    - id: totals
      task: aggregate
      needs: [east, west]
      with: {how: sum, field: "orders[].total"}      # JMESPath, applied to each need's output
    - id: big
      task: filter
      with: {data: "${{ steps.load.output.rows }}", where: "total > `100`"}
    - id: names
      task: transform
      with: {data: "${{ steps.big.output }}", expression: "[].customer"}

``aggregate`` combines the outputs of the steps it needs, in the order of its ``needs``:
``concat`` (lists joined; any other output is one item), ``merge`` (mappings, the later
need's keys over the earlier's), ``sum`` (numbers), ``group_by`` (records grouped by the
value of a key). ``transform`` applies a JMESPath expression; ``filter`` keeps the items of
a list for which a JMESPath condition holds. Expressions are checked when the plan is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jmespath
import jmespath.exceptions

from baton.errors import TaskFailed
from baton.plan.refs import has_refs
from baton.tasks.registry import TaskContext, TaskDef

HOWS = ("concat", "merge", "sum", "group_by")


def _compiled(expression: str, what: str) -> Any:
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise TaskFailed(f"{what}: not a JMESPath expression: {exc}") from None


def _expression_problems(inputs: Mapping[str, Any], key: str, *, required: bool) -> list[str]:
    value = inputs.get(key)
    if value is None:
        return [f"{key} is required (a JMESPath expression)"] if required else []
    if not isinstance(value, str):
        return [f"{key} must be a JMESPath expression (a string)"]
    if has_refs(value):
        return []
    try:
        jmespath.compile(value)
    except jmespath.exceptions.JMESPathError as exc:
        return [f"{key}: not a JMESPath expression: {str(exc).splitlines()[0]}"]
    return []


async def aggregate(ctx: TaskContext, how: str, field: str | None = None, by: str | None = None) -> Any:
    """Combine the outputs of the steps this one needs."""
    if how not in HOWS:
        raise TaskFailed(f"aggregate: how must be one of {', '.join(HOWS)}, not {how!r}")
    outputs = list((await ctx.need_outputs()).values())
    if field is not None:
        picked = _compiled(field, "aggregate field")
        outputs = [picked.search(o) for o in outputs]
    ctx.details["inputs"] = len(outputs)
    if how == "concat":
        return [item for o in outputs for item in (o if isinstance(o, list) else [o])]
    if how == "merge":
        merged: dict[str, Any] = {}
        for o in outputs:
            if not isinstance(o, dict):
                raise TaskFailed(f"aggregate merge: every input must be a mapping, not {type(o).__name__}")
            merged.update(o)
        return merged
    if how == "sum":
        numbers = [item for o in outputs for item in (o if isinstance(o, list) else [o])]
        wrong = [n for n in numbers if isinstance(n, bool) or not isinstance(n, int | float)]
        if wrong:
            raise TaskFailed(f"aggregate sum: not a number: {wrong[0]!r}")
        total = math.fsum(numbers)
        return int(total) if all(isinstance(n, int) for n in numbers) else total
    if by is None:
        raise TaskFailed("aggregate group_by: by (the key to group on) is required")
    groups: dict[str, list[Any]] = {}
    for record in (item for o in outputs for item in (o if isinstance(o, list) else [o])):
        if not isinstance(record, dict) or by not in record:
            raise TaskFailed(f"aggregate group_by: a record without {by!r}: {record!r}"[:300])
        groups.setdefault(str(record[by]), []).append(record)
    return groups


def _aggregate_problems(inputs: Mapping[str, Any]) -> list[str]:
    how = inputs.get("how")
    problems = []
    if not (isinstance(how, str) and has_refs(how)) and how not in HOWS:
        problems.append(f"how must be one of {', '.join(HOWS)}, not {how!r}")
    if how == "group_by" and not inputs.get("by"):
        problems.append("group_by needs by (the key to group on)")
    return problems + _expression_problems(inputs, "field", required=False)


async def transform(data: Any, expression: str) -> Any:
    """``data`` reshaped by a JMESPath ``expression``."""
    return _compiled(expression, "transform").search(data)


async def filter_(data: Any, where: str) -> list[Any]:
    """The items of the list ``data`` for which the JMESPath condition ``where`` holds."""
    if not isinstance(data, list):
        raise TaskFailed(f"filter: data must be a list, not {type(data).__name__}")
    condition = _compiled(where, "filter")
    return [item for item in data if _truthy(condition.search(item))]


def _truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    return len(value) > 0 if isinstance(value, str | list | dict) else True


INTENTS = [
    TaskDef.of("aggregate", aggregate, check=_aggregate_problems),
    TaskDef.of("transform", transform, check=lambda i: _expression_problems(i, "expression", required=True)),
    TaskDef.of("filter", filter_, check=lambda i: _expression_problems(i, "where", required=True)),
]

__all__ = ["HOWS", "INTENTS", "aggregate", "filter_", "transform"]
