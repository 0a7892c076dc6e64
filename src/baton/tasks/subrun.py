"""``plan``: a step that runs a plan as a child run, its output the child's result.

    - id: build
      task: plan
      with:
        plan: ${{ steps.planner.output.value }}     # or the plan inline

The child is submitted under an idempotency key of the parent's run and step, so a retry
of the step, or its recovery after a crash, finds the child it started and waits for it
again: a step never starts a second child. A pause, resume or cancel of the parent
reaches the child (the engine follows the link it keeps), and cancelling the step cancels
the child. The child is held to what is left of the parent's budgets when it starts
(its own, if lower), and what it spent is booked to the parent's when it ends.

In a confined step (an API key holder's run), the child's steps may use only the step's
own role, and run confined too.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from baton.errors import Conflict, PlanError, TaskFailed
from baton.plan.model import Budget
from baton.status import RunStatus
from baton.store.base import BudgetSettle
from baton.tasks.registry import TaskContext, TaskDef

if TYPE_CHECKING:
    from baton.engine.engine import Engine

TASK = "plan"
#: how often a step whose child is paused looks again
PAUSED_POLL_S = 0.2


def make_plan_task(engine: Engine) -> TaskDef:
    """The ``plan`` task of one engine."""

    async def run_plan(ctx: TaskContext, plan: Any, name: str | None = None) -> dict[str, Any]:
        """Run ``plan`` as a child run and wait for it; its outputs and its result (the
        output of its last step)."""
        if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list):
            raise TaskFailed("plan: expected a plan document (a mapping with steps)")
        doc = {**plan, "name": name or plan.get("name") or f"{ctx.step_id} of {ctx.run_id}"}
        budget = await _left(engine, ctx, doc.get("budget"))
        if budget is not None:
            doc["budget"] = budget
        if ctx.confinement is not None:
            doc = _confined(engine, ctx, doc)
        key = f"subrun:{ctx.run_id}:{ctx.step_id}"
        try:
            handle = await engine.submit(
                doc, idempotency_key=key, parent=(ctx.run_id, ctx.step_id), actor=f"run:{ctx.run_id}"
            )
        except PlanError as exc:
            raise TaskFailed(f"plan: the child's plan is invalid: {exc.message}") from None
        except Conflict:
            raise TaskFailed("plan: this step started a child of another plan before") from None
        child = handle.run_id
        ctx.details["child_run"] = child
        try:
            record = await _ended(engine, child)
        except asyncio.CancelledError:  # the step is cancelled: so is its child
            with contextlib.suppress(Exception):
                await asyncio.shield(engine.cancel(child, actor=f"run:{ctx.run_id}"))
            raise
        await _book(engine, ctx, child)
        steps = await engine.store.get_steps(child)
        outputs = {s.step_id: s.output for s in steps}
        if record.status is not RunStatus.COMPLETED:
            raise TaskFailed(
                f"plan: child run {child} {record.status}: {record.error or 'no error recorded'}"
            )
        return {"run_id": child, "status": str(record.status), "outputs": outputs, "result": steps[-1].output}

    return TaskDef.of(TASK, run_plan, needs=("plan",))


async def _ended(engine: Engine, child: str) -> Any:
    """Wait for the child to end (a paused child is waited for until it is resumed)."""
    while True:
        record = await engine.wait(child)
        if record.status.terminal:
            return record
        await asyncio.sleep(PAUSED_POLL_S)


async def _left(engine: Engine, ctx: TaskContext, own: Any) -> dict[str, Any] | None:
    """The child's budget: what is left of the parent's run and step budgets, or its own
    where that is lower."""
    limits = [b for b in (ctx.run_budget, ctx.step_budget) if b is not None]
    if not limits:
        return own if isinstance(own, dict) else None
    ledger = {e.scope: e for e in await engine.store.budget_ledger(ctx.run_id)}
    usd: float | None = None
    tokens: int | None = None
    for scope, limit in (("run", ctx.run_budget), (f"step:{ctx.step_id}", ctx.step_budget)):
        if limit is None:
            continue
        entry = ledger.get(scope)
        spent_usd = (entry.spent_usd + entry.reserved_usd) if entry else 0.0
        spent_tokens = (entry.spent_tokens + entry.reserved_tokens) if entry else 0
        if limit.usd is not None:
            left = max(0.0, limit.usd - spent_usd)
            usd = left if usd is None else min(usd, left)
        if limit.tokens is not None:
            left_tokens = max(0, limit.tokens - spent_tokens)
            tokens = left_tokens if tokens is None else min(tokens, left_tokens)
    mine = Budget.model_validate(own) if isinstance(own, dict) else Budget()
    if mine.usd is not None:
        usd = mine.usd if usd is None else min(usd, mine.usd)
    if mine.tokens is not None:
        tokens = mine.tokens if tokens is None else min(tokens, mine.tokens)
    exhausted = limits[-1].on_exhausted if own is None else mine.on_exhausted
    return Budget(usd=usd, tokens=tokens, on_exhausted=exhausted).model_dump(exclude_none=True)


async def _book(engine: Engine, ctx: TaskContext, child: str) -> None:
    """What the child spent, booked to the parent's budgets."""
    spent = next((e for e in await engine.store.budget_ledger(child) if e.scope == "run"), None)
    if spent is None or (spent.spent_usd == 0 and spent.spent_tokens == 0):
        return
    scopes = [s for s, b in (("run", ctx.run_budget), (f"step:{ctx.step_id}", ctx.step_budget)) if b]
    settles = [BudgetSettle(scope, 0, 0.0, spent.spent_tokens, spent.spent_usd) for scope in scopes]
    if settles:
        await engine.store.budget_settle(ctx.run_id, settles)
    ctx.details["child_spent"] = {"usd": round(spent.spent_usd, 8), "tokens": spent.spent_tokens}


def _confined(engine: Engine, ctx: TaskContext, doc: dict[str, Any]) -> dict[str, Any]:
    """A confined step's child: its steps under the step's role only, confined too."""
    assert ctx.confinement is not None
    role = ctx.confinement.role
    try:
        loaded = engine.load(doc)
    except PlanError as exc:
        raise TaskFailed(f"plan: the child's plan is invalid: {exc.message}") from None
    grants = (role,) if role is not None else ()
    problems = engine.policy.check_plan(loaded, engine.registry, "sub-run", grants=grants)
    if problems:
        listed = "; ".join(f"{p.where}: {p.message}" for p in problems)
        raise TaskFailed(f"plan: the child asks for what role {role!r} may not: {listed}")
    steps = [{**s, "role": s.get("role") or role} for s in doc["steps"] if isinstance(s, dict)]
    policy = {**(doc.get("policy") or {}), "sandbox": True}
    return {**doc, "steps": steps, "policy": policy}


__all__ = ["TASK", "make_plan_task"]
