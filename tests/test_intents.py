"""The model-free workflow intents: aggregate, transform and filter, as plan steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from baton import Engine, RunStatus
from baton.errors import PlanError

EAST = {
    "orders": [
        {"customer": "ada", "total": 120, "region": "east"},
        {"customer": "bo", "total": 40, "region": "east"},
    ]
}
WEST = {"orders": [{"customer": "cy", "total": 300, "region": "west"}]}


async def outputs(
    tmp_path: Path, steps: list[dict[str, Any]]
) -> tuple[RunStatus, dict[str, Any], dict[str, Any]]:
    plan = {
        "name": "intents",
        "steps": [
            {"id": "east", "task": "echo", "with": EAST},
            {"id": "west", "task": "echo", "with": WEST},
            *steps,
        ],
    }
    async with Engine(str(tmp_path / "i.db"), workdir=tmp_path) as engine:
        record = await engine.run(plan)
        steps_ = await engine.store.get_steps(record.id)
    return record.status, {s.step_id: s.output for s in steps_}, {s.step_id: s.error for s in steps_}


async def test_aggregate_combines_the_outputs_of_its_needs_in_their_order(tmp_path: Path) -> None:
    both = ["east", "west"]
    status, out, _ = await outputs(
        tmp_path,
        [
            {"id": "all", "task": "aggregate", "needs": both, "with": {"how": "concat", "field": "orders"}},
            {
                "id": "total",
                "task": "aggregate",
                "needs": both,
                "with": {"how": "sum", "field": "orders[].total"},
            },
            {"id": "merged", "task": "aggregate", "needs": ["west", "east"], "with": {"how": "merge"}},
            {
                "id": "by_region",
                "task": "aggregate",
                "needs": both,
                "with": {"how": "group_by", "field": "orders", "by": "region"},
            },
        ],
    )
    assert status is RunStatus.COMPLETED
    assert [o["customer"] for o in out["all"]] == ["ada", "bo", "cy"]
    assert out["total"] == 460
    assert out["merged"] == EAST  # the later need's keys win
    assert {k: len(v) for k, v in out["by_region"].items()} == {"east": 2, "west": 1}


async def test_filter_and_transform_with_jmespath(tmp_path: Path) -> None:
    status, out, _ = await outputs(
        tmp_path,
        [
            {
                "id": "all",
                "task": "aggregate",
                "needs": ["east", "west"],
                "with": {"how": "concat", "field": "orders"},
            },
            {
                "id": "big",
                "task": "filter",
                "needs": ["all"],
                "with": {"data": "${{ steps.all.output }}", "where": "total > `100`"},
            },
            {
                "id": "names",
                "task": "transform",
                "needs": ["big"],
                "with": {"data": "${{ steps.big.output }}", "expression": "[].customer"},
            },
            {
                "id": "none",
                "task": "filter",
                "needs": ["all"],
                "with": {"data": "${{ steps.all.output }}", "where": "total > `1000`"},
            },
        ],
    )
    assert status is RunStatus.COMPLETED
    assert out["names"] == ["ada", "cy"] and out["none"] == []


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {"id": "x", "task": "transform", "with": {"data": [], "expression": "[?"}},
            "expression: not a JMESPath expression",
        ),
        ({"id": "x", "task": "filter", "with": {"data": []}}, "where is required"),
        (
            {"id": "x", "task": "aggregate", "with": {"how": "average"}},
            "how must be one of concat, merge, sum, group_by",
        ),
        ({"id": "x", "task": "aggregate", "with": {"how": "group_by"}}, "group_by needs by"),
    ],
)
async def test_bad_intents_are_refused_when_the_plan_is_checked(
    step: dict[str, Any], message: str, tmp_path: Path
) -> None:
    async with Engine(str(tmp_path / "b.db"), workdir=tmp_path) as engine:
        with pytest.raises(PlanError, match=message):
            await engine.submit({"name": "bad", "steps": [step]})
        assert await engine.store.list_runs() == []


async def test_data_of_the_wrong_shape_fails_the_step_with_the_reason(tmp_path: Path) -> None:
    status, _, errors = await outputs(
        tmp_path,
        [
            {
                "id": "sum",
                "task": "aggregate",
                "needs": ["east"],
                "with": {"how": "sum", "field": "orders[].customer"},
            },
            {
                "id": "only",
                "task": "filter",
                "needs": ["east"],
                "with": {"data": "${{ steps.east.output }}", "where": "total"},
            },
        ],
    )
    assert status is RunStatus.FAILED
    assert "aggregate sum: not a number: 'ada'" in (errors["sum"] or "")
    assert "filter: data must be a list, not dict" in (errors["only"] or "")
