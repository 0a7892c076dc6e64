"""Goals: a task in words carried out as a durable run.

``engine.achieve("Create a NATS consumer for user events", language="elixir")``:

1. the task is classified (baton.agents.classify);
2. a template is chosen along the fallback chain by what the recorded outcomes say
   (baton.agents.learning), the draw seeded and kept with the goal;
3. the template's sub-tasks become a plan of ``llm.generate`` steps (its decomposition
   skeleton), which the engine runs like any other plan: durably, in parallel where the
   needs allow, each model call through the gateway's cost ladder (rules, cache, model);
4. once the run has ended, each sub-task's outcome is recorded, exactly once whichever
   process collects it, and the next choice learns from it.

The goal's record (task type, template, draw) is written with the run, in one
transaction: a run of a goal never exists without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from baton.agents.classify import GENERAL, Classification, check_language, check_text, classify
from baton.agents.learning import Knowledge, choose, roll_up
from baton.agents.planner import planned_subtasks
from baton.agents.quality import quality
from baton.agents.templates import Library, SubTask, Template, render
from baton.errors import UsageError
from baton.plan.model import COMPLEXITY_PRESETS
from baton.status import RunStatus, StepStatus
from baton.store.base import GoalRecord, OutcomeRecord, StepRecord

if TYPE_CHECKING:
    from baton.engine.engine import Engine, RunHandle

COMPLEXITIES: tuple[str, ...] = tuple(COMPLEXITY_PRESETS)
CONTEXT_KEYS = ("workspace", "target_file", "context")
#: where a goal's sub-tasks come from: a template's skeleton, or a planner model
DECOMPOSE = ("template", "planner")
#: the most outcomes read to learn from (the newest)
HISTORY = 20_000
#: what answered, from the cheapest rung up: a goal is answered by the dearest rung any of
#: its sub-tasks used
RUNGS = ("autonomous", "cached", "llm", "fallback")


@dataclass(slots=True)
class GoalResult:
    """What a goal produced and what it took (the shapes of the NATS reply)."""

    run_id: str
    status: str
    result: Any
    task_type: str
    template_used: str
    model_used: str | None
    method: str
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "result": self.result,
            "task_type": self.task_type,
            "template_used": self.template_used,
            "model_used": self.model_used,
            "method": self.method,
            "metrics": self.metrics,
            "error": self.error,
        }


class Agents:
    """The goal layer of one engine: its template library and what it learned."""

    def __init__(self, engine: Engine, library: Library | None = None, *, semantic: bool = True) -> None:
        self.engine = engine
        self.library = library or Library.load()
        #: classify on the embeddings too when no rule is sure (and the extra is installed)
        self.semantic = semantic

    async def start(
        self,
        goal: str,
        *,
        language: str | None = None,
        complexity: str | None = None,
        context: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
        key_role: str | None = None,
        decompose: str = "template",
        template: str | None = None,
    ) -> RunHandle:
        """Classify, choose a template, submit its plan; the run's handle.

        ``decompose``: the sub-tasks are a template's skeleton (``template``), or a planner
        model's answer (``planner``: templates with a planner are chosen among).
        ``template``: this template, not drawn (what it does is learned all the same)."""
        if decompose not in DECOMPOSE:
            raise UsageError(f"decompose must be one of {', '.join(DECOMPOSE)}, not {decompose!r}")
        text = check_text(goal)
        language = check_language(language)
        if complexity is not None and complexity not in COMPLEXITIES:
            raise UsageError(f"unknown complexity {complexity!r} (known: {', '.join(COMPLEXITIES)})")
        values = _context(context)
        kind = classify(text, language, semantic=self.semantic)
        # The same request under the same key is the same goal, whatever was learned since;
        # and a request done before is done by the same template, so that the cache, which
        # comes before the model, can answer its sub-tasks.
        request = {"goal": text, "language": language, "complexity": complexity, "context": values}
        if decompose != "template":
            request["decompose"] = decompose
        if template is not None:
            request["template"] = template
        fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        await self.collect()
        earlier = await self.engine.store.goal_done_before(fingerprint)
        if template is not None:
            chosen = self.library.get(template)
            selection: dict[str, Any] = {"chosen": chosen.id, "given": True}
        elif earlier is not None and earlier.template_id in self.library.templates:
            chosen = self.library.templates[earlier.template_id]
            selection = {"chosen": chosen.id, "repeat_of": earlier.run_id}
        else:
            known = Knowledge.of(roll_up(await self.engine.store.outcomes(limit=HISTORY)), time.time())
            seed = _seed(idempotency_key, text)
            candidates = self.library.candidates(kind.type, language, planned=decompose == "planner")
            choice = choose(candidates, known, kind.type, language, seed)
            chosen, selection = choice.template, choice.record
        filled = _filled(text, language, values)
        if chosen.planner is not None:  # a model makes the sub-tasks (refused: nothing written)
            asked = render(chosen.planner.prompt, filled).strip()
            subtasks = await planned_subtasks(self.engine, chosen.planner, asked, actor=actor)
            selection["planned"] = [s.id for s in subtasks]
        else:
            subtasks = list(chosen.subtasks)
        selection["result"] = chosen.result_of(subtasks)
        plan = self.plan(chosen, filled, language, complexity, subtasks)
        record = GoalRecord(
            run_id="",
            text=text,
            task_type=kind.type,
            template_id=chosen.id,
            created_at=time.time(),
            language=language,
            complexity=complexity,
            method=kind.method,
            confidence=kind.confidence,
            selection={**selection, "classification": kind.to_dict()},
            request=fingerprint,
        )
        return await self.engine.submit(
            plan,
            idempotency_key=idempotency_key,
            actor=actor,
            key_role=key_role,
            goal=record,
            fingerprint=fingerprint,
        )

    def plan(
        self,
        template: Template,
        filled: Mapping[str, str],
        language: str | None,
        complexity: str | None,
        subtasks: Sequence[SubTask] | None = None,
    ) -> dict[str, Any]:
        """The plan of the sub-tasks (``template``'s own unless given), its placeholders
        ``filled`` (see :func:`_filled`)."""
        tiers = self.engine.gateway.config.tiers
        steps = []
        for sub in template.subtasks if subtasks is None else subtasks:
            # What a model planned must not read as references between steps either.
            prompt = render(sub.prompt, filled).strip().replace("${{", "$ {{")
            inputs: dict[str, Any] = {"prompt": prompt, "extract": sub.extract}
            if sub.extract == "code" and language is not None:
                inputs["language"] = language
            tier = sub.tier or template.tier
            if tier is not None and tier in tiers:  # a tier the LLM config lacks: routing decides
                inputs["tier"] = tier
            if sub.max_tokens is not None:
                inputs["max_tokens"] = sub.max_tokens
            step: dict[str, Any] = {"id": sub.id, "task": "llm.generate", "with": inputs}
            if sub.needs:
                step["needs"] = list(sub.needs)
            if sub.validate_:
                step["validate"] = [dict(v) for v in sub.validate_]
            if sub.role is not None:
                step["role"] = sub.role
            steps.append(step)
        plan: dict[str, Any] = {"name": f"goal-{template.id}", "steps": steps}
        if complexity is not None:
            plan["policy"] = {"complexity": complexity}
        return plan

    async def achieve(self, goal: str, **options: Any) -> GoalResult:
        """Carry out ``goal`` and wait for it; its result, with its outcomes recorded."""
        timeout_s = options.pop("timeout_s", None)
        handle = await self.start(goal, **options)
        await handle.wait(timeout_s=timeout_s)
        await self.collect()
        return await self.result(handle.run_id)

    async def result(self, run_id: str) -> GoalResult:
        """The result of a goal's run as it stands."""
        store = self.engine.store
        goal = await store.get_goal(run_id)
        if goal is None:
            raise UsageError(f"run {run_id} is not a goal's")
        run = await store.get_run(run_id, with_plan=False)
        steps = {s.step_id: s for s in await store.get_steps(run_id)}
        attempts = await store.get_attempts(run_id)
        details = _details(attempts)
        result_id = str(goal.selection.get("result") or list(steps)[-1])
        last = steps.get(result_id)
        output = last.output if last is not None else None
        methods = [str(d.get("source")) for d in details.values() if d.get("source") in RUNGS]
        every = [a.detail or {} for a in attempts]  # retries cost too
        tokens = sum(_tokens(d) for d in every)
        cost = math.fsum(float(d.get("cost_usd") or 0.0) for d in every)
        qualities = [
            quality(s.output, succeeded=s.status is StepStatus.SUCCEEDED, checked=False)
            for s in steps.values()
        ]
        started, ended = run.started_at or run.created_at, run.finished_at or time.time()
        return GoalResult(
            run_id=run_id,
            status=str(run.status),
            result=output.get("text") if isinstance(output, dict) else output,
            task_type=goal.task_type,
            template_used=goal.template_id,
            model_used=str(details.get(result_id, {}).get("model") or "") or None,
            method=max(methods, key=RUNGS.index) if methods else "llm",
            metrics={
                "time_ms": round(1000 * (ended - started), 1),
                "tokens_used": tokens,
                "cost_usd": round(cost, 8),
                "cache_hit": "cached" in methods,
                "quality": round(math.fsum(qualities) / len(qualities), 4) if qualities else 0.0,
                "success": run.status is RunStatus.COMPLETED,
            },
            outputs={k: s.output for k, s in steps.items()},
            error=run.error,
        )

    async def collect(self, limit: int = 100) -> int:
        """Record the outcomes of the goals whose runs ended and are not recorded yet; how
        many goals this call recorded (another process may record some first: each goal's
        outcomes are written once)."""
        store = self.engine.store
        recorded = 0
        for goal in await store.pending_goals(limit):
            outcomes = await self.outcomes_of(goal)
            recorded += await store.record_outcomes(goal.run_id, outcomes, time.time())
        return recorded

    async def outcomes_of(self, goal: GoalRecord) -> list[OutcomeRecord]:
        """Each sub-task's outcome of an ended goal."""
        store = self.engine.store
        run = await store.get_run(goal.run_id)
        plan_steps = {s["id"]: s for s in (run.plan or {}).get("steps", [])}
        attempts = await store.get_attempts(goal.run_id)
        details = _details(attempts)
        now = time.time()
        out = []
        for step in await store.get_steps(goal.run_id):
            spec = plan_steps.get(step.step_id, {})
            detail = details.get(step.step_id, {})
            spent = [a for a in attempts if a.step_id == step.step_id]
            cost = math.fsum(float((a.detail or {}).get("cost_usd") or 0.0) for a in spent)
            out.append(
                OutcomeRecord(
                    run_id=goal.run_id,
                    step_id=step.step_id,
                    template_id=goal.template_id,
                    task_type=goal.task_type,
                    language=goal.language,
                    success=step.status is StepStatus.SUCCEEDED,
                    quality=quality(
                        step.output,
                        succeeded=step.status is StepStatus.SUCCEEDED,
                        checked=bool(spec.get("validate")),
                        extract=str(spec.get("with", {}).get("extract", "text")),
                    ),
                    time_s=round(_busy(step), 6),
                    cost_usd=round(cost, 10),
                    method=str(detail.get("source") or step.task),
                    recorded_at=now,
                )
            )
        return out

    async def stats(self) -> dict[str, Any]:
        """Executions, their average time, success rate and template usage."""
        await self.collect()
        goals = roll_up(await self.engine.store.outcomes(limit=HISTORY))
        usage = Counter(g.template_id for g in goals)
        types = Counter(g.task_type for g in goals)
        return {
            "total_executions": len(goals),
            "average_time_s": round(math.fsum(g.time_s for g in goals) / len(goals), 4) if goals else None,
            "success_rate": round(sum(g.success for g in goals) / len(goals), 4) if goals else None,
            "template_usage": dict(usage.most_common()),
            "task_types": dict(types.most_common()),
        }


def _filled(text: str, language: str | None, values: Mapping[str, str]) -> dict[str, str]:
    """What a template's placeholders become: ``{{context}}`` carries all of the context
    (the workspace and the target file too, for templates that do not place them). The
    task's words are the user's: they must not read as references between steps."""
    safe = {k: v.replace("${{", "$ {{") for k, v in values.items()}
    block = [f"Workspace: {safe['workspace']}"] if "workspace" in safe else []
    block += [f"Target file: {safe['target_file']}"] if "target_file" in safe else []
    block += [safe["context"]] if "context" in safe else []
    return {
        **safe,
        "task": text.replace("${{", "$ {{"),
        "language": language or "the language the task implies",
        "context": "\n".join(block),
    }


def _context(context: Mapping[str, Any] | None) -> dict[str, str]:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise UsageError("context must be a mapping (workspace, target_file, context)")
    unknown = [k for k in context if k not in CONTEXT_KEYS]
    if unknown:
        raise UsageError(f"unknown context key(s) {unknown} (known: {', '.join(CONTEXT_KEYS)})")
    values = {}
    for key, value in context.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise UsageError(f"context.{key} must be a string")
        values[key] = check_text(value) if key == "context" else value
    return values


def _seed(idempotency_key: str | None, text: str) -> int:
    """A goal's seed: from its idempotency key (the same goal draws the same), else fresh."""
    basis = idempotency_key if idempotency_key is not None else f"{text}\x00{time.time_ns()}"
    return int.from_bytes(hashlib.sha256(basis.encode()).digest()[:8], "big")


def _details(attempts: list[Any]) -> dict[str, dict[str, Any]]:
    """Each step's last attempt's details."""
    last: dict[str, Any] = {}
    for a in sorted(attempts, key=lambda a: a.attempt):
        last[a.step_id] = a.detail or {}
    return last


def _tokens(detail: Mapping[str, Any]) -> int:
    usage = detail.get("usage")
    if not isinstance(usage, Mapping):
        return 0
    return int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)


def _busy(step: StepRecord) -> float:
    if step.started_at is None or step.finished_at is None:
        return 0.0
    return max(0.0, step.finished_at - step.started_at)


__all__ = ["COMPLEXITIES", "GENERAL", "Agents", "Classification", "GoalResult"]
