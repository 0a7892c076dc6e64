"""Decomposition by a planner model: for a template with a ``planner``, a model breaks
the task into sub-tasks, and its answer becomes the goal's plan.

The planner is asked for sub-tasks in the templates' own form — an id, a prompt, the
earlier sub-tasks it needs, what to extract — never for tasks: whatever it answers, the
plan it becomes runs model calls only. Its answer is checked like a template file
(unique ids, needs on earlier sub-tasks, at most ``max_subtasks``); a rejected answer is
fed back to the planner by the step's own retry loop (baton.llm.tasks), and after its
attempts the goal is refused with the last reason, nothing of it written.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from baton.agents.templates import GENERAL, Planner, SubTask, Template
from baton.errors import TaskFailed, UsageError

if TYPE_CHECKING:
    from baton.engine.engine import Engine

#: the sub-tasks a planner may make, whatever its template allows
MOST_SUBTASKS = 32
ANSWER_FORMAT = (
    'Answer with JSON only: {"subtasks": [{"id": "short-id", "prompt": "what to ask a model", '
    '"needs": ["ids of earlier sub-tasks whose results it uses"], "extract": "text" or "code"}]}. '
    "Ids are lower case letters, digits, - and _. Each prompt must stand on its own: the results "
    "of the sub-tasks it needs are given to it."
)


def subtask_problems(answer: Any, most: int = MOST_SUBTASKS) -> list[str]:
    """What is wrong with a planner's answer (none: it can become a plan)."""
    try:
        parsed = _parse(answer, most)
    except ValueError as exc:
        return [str(exc)]
    return [message for _, message in parsed.problems()]


def _parse(answer: Any, most: int) -> Template:
    value = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the answer is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(value, dict) or not isinstance(value.get("subtasks"), list):
        raise ValueError('the answer must be a JSON object with a list "subtasks"')
    subtasks = value["subtasks"]
    if not 1 <= len(subtasks) <= most:
        raise ValueError(f"there must be 1 to {most} sub-tasks, not {len(subtasks)}")
    try:
        parts = [SubTask.model_validate(s) for s in subtasks]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"a sub-task is wrong: {where}: {first['msg']}") from None
    for part in parts:
        if part.validate_ or part.role or part.tier or part.max_tokens:
            raise ValueError(f"sub-task {part.id!r}: a planner gives id, prompt, needs and extract only")
    return Template.model_construct(id="planned", task_type=GENERAL, language=None, subtasks=parts)


async def planned_subtasks(
    engine: Engine, planner: Planner, prompt: str, *, actor: str | None = None
) -> list[SubTask]:
    """Ask the planner model (through the executor, with its retries) for the sub-tasks."""
    asked = f"{prompt}\n\nAt most {planner.max_subtasks} sub-tasks. {ANSWER_FORMAT}"
    inputs: dict[str, Any] = {"prompt": asked, "extract": "json", "rules": False}
    if planner.tier is not None and planner.tier in engine.gateway.config.tiers:
        inputs["tier"] = planner.tier
    check = {"kind": "python", "function": "baton.agents.planner:check_answer"}
    try:
        output = await engine.execute(
            "llm.generate",
            inputs,
            actor=actor,
            validate=[check],
            retry={"attempts": planner.attempts, "backoff_s": 0.01},
        )
    except TaskFailed as exc:
        raise UsageError(
            f"the planner's answer is not a valid plan after {planner.attempts} attempt(s): {exc.message}"
        ) from None
    return list(_parse(output["text"], MOST_SUBTASKS).subtasks)


def check_answer(answer: Any) -> list[str]:
    """The validator of the planner's step: what to feed back."""
    return subtask_problems(answer)


__all__ = ["ANSWER_FORMAT", "MOST_SUBTASKS", "check_answer", "planned_subtasks", "subtask_problems"]
