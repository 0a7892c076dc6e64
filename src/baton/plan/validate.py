"""Plan loading and validation: every problem at once, before anything is written.

Type problems come from the pydantic model (each step is checked on its own, so one bad
step does not hide the others); graph and reference problems are checked on the steps
that parsed. A plan with any problem raises :class:`PlanError` listing all of them.

Text is read within the bounds of :mod:`baton.plan.reader`, and a plan has at most
``max_steps`` steps (MAX_PLAN_STEPS unless the engine says otherwise), counted before any
step is looked at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from baton.errors import PlanError, Problem
from baton.plan.dag import find_cycle, topo_order, transitive_needs
from baton.plan.model import Plan, Step
from baton.plan.reader import DocumentError, load_json, load_yaml, read_text
from baton.plan.refs import RefSyntaxError, find_refs, iter_strings, parse_ref, plan_inputs
from baton.tasks.registry import Registry
from baton.validators import option_problems


def _where(loc: Sequence[int | str], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_problems(exc: ValidationError, prefix: str = "") -> list[Problem]:
    return [Problem(_where(e["loc"], prefix), e["msg"]) for e in exc.errors()]


#: the most steps a plan may have unless the engine allows another number (max_plan_steps)
MAX_PLAN_STEPS = 100_000


def read_plan_text(text: str, source: str | None = None) -> Any:
    """Parse YAML (JSON is YAML too, but is parsed by json for speed and exact errors),
    within the reader's bounds: aliases, duplicate keys, NUL characters, deep nesting and
    integers past 64 bits are refused."""
    try:
        if text.lstrip().startswith("{"):
            return load_json(text)
        return load_yaml(text)
    except DocumentError as exc:
        raise PlanError([Problem("", str(exc))], source) from None


def load_plan(path: str | Path, registry: Registry, *, max_steps: int = MAX_PLAN_STEPS) -> Plan:
    """Read, parse and validate a plan file."""
    p = Path(path)
    try:
        text = read_text(p)
    except FileNotFoundError:
        raise PlanError([Problem("", f"no such file: {p}")], str(p)) from None
    except (OSError, UnicodeDecodeError, DocumentError) as exc:
        raise PlanError([Problem("", f"cannot read {p}: {exc}")], str(p)) from None
    return parse_plan(read_plan_text(text, str(p)), registry, source=str(p), max_steps=max_steps)


def _too_many(count: int, max_steps: int) -> Problem:
    return Problem("steps", f"{count} steps; a plan may have at most {max_steps} (max_plan_steps)")


def parse_plan(
    raw: Any, registry: Registry, source: str | None = None, *, max_steps: int = MAX_PLAN_STEPS
) -> Plan:
    """Validate a plan given as plain data (the parsed file); raise PlanError with all problems."""
    if isinstance(raw, Plan):
        return validate_plan(raw, registry, source, max_steps=max_steps)
    if not isinstance(raw, Mapping):
        raise PlanError([Problem("", "a plan must be a mapping with 'name' and 'steps'")], source)
    problems: list[Problem] = []
    steps_raw: Any = raw.get("steps")
    steps: list[Step] = []
    typed: list[bool] = []
    if not isinstance(steps_raw, list):
        problems.append(Problem("steps", "required: a list of steps"))
    elif not steps_raw:
        problems.append(Problem("steps", "a plan needs at least one step"))
    elif len(steps_raw) > max_steps:  # before any step is looked at
        raise PlanError([_too_many(len(steps_raw), max_steps)], source)
    else:
        for i, s in enumerate(steps_raw):
            try:
                steps.append(Step.model_validate(s))
                typed.append(True)
            except ValidationError as exc:
                problems += _pydantic_problems(exc, f"steps[{i}]")
                steps.append(_partial_step(s, i))
                typed.append(False)
    header = {k: v for k, v in raw.items() if k != "steps"}
    try:
        plan = Plan.model_validate({**header, "steps": []})
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
        plan = None
    problems += graph_problems(steps, registry, typed)
    if problems or plan is None:
        raise PlanError(problems, source)
    return plan.model_copy(update={"steps": steps})


def validate_plan(
    plan: Plan, registry: Registry, source: str | None = None, *, max_steps: int = MAX_PLAN_STEPS
) -> Plan:
    """Check a plan built in Python; the model already holds the types."""
    if len(plan.steps) > max_steps:
        raise PlanError([_too_many(len(plan.steps), max_steps)], source)
    problems = graph_problems(plan.steps, registry)
    if not plan.steps:
        problems.insert(0, Problem("steps", "a plan needs at least one step"))
    if problems:
        raise PlanError(problems, source)
    return plan


def _partial_step(raw: Any, position: int) -> Step:
    """What can be read of a step that failed its type checks, so that the graph checks
    still know it (its id, needs and references); the rest was reported already."""
    data: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    sid = data.get("id")
    task = data.get("task")
    needs = data.get("needs")
    inputs = data.get("with")
    return Step.model_construct(
        id=sid if isinstance(sid, str) else f"steps[{position}]",  # cannot clash: not a valid id
        task=task if isinstance(task, str) else "",
        needs=[n for n in needs if isinstance(n, str)] if isinstance(needs, list) else [],
        inputs=inputs if isinstance(inputs, dict) else {},
    )


def graph_problems(
    steps: Sequence[Step], registry: Registry, typed: Sequence[bool] | None = None
) -> list[Problem]:
    """Duplicate ids, unknown needs, cycles, unknown tasks, bad inputs and references.

    ``typed[i]`` False marks a step that failed its type checks: only its id, needs and
    references take part (its other problems were reported already).
    """
    problems: list[Problem] = []
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.id in index:
            problems.append(
                Problem(f"steps[{i}].id", f"duplicate step id {step.id!r} (first at steps[{index[step.id]}])")
            )
        else:
            index[step.id] = i

    needs: list[list[int]] = []
    for i, step in enumerate(steps):
        mine: list[int] = []
        for need in step.needs:
            if need == step.id:
                problems.append(Problem(f"steps[{i}].needs", f"step {step.id!r} needs itself"))
            elif need not in index:
                problems.append(
                    Problem(f"steps[{i}].needs", f"unknown step {need!r} in needs of {step.id!r}")
                )
            else:
                mine.append(index[need])
        needs.append(mine)

    order, leftover = topo_order(needs)  # Kahn leaves the nodes on (or behind) cycles
    if leftover:
        cycle = find_cycle(needs, leftover)
        path = " -> ".join(steps[i].id for i in cycle)
        problems.append(Problem("steps", f"cycle: {path}"))

    # Every reference first (step, where, what is wrong or "", the step named or -1), so
    # that whether each names a transitive need is answered for all of them at once.
    refs: list[tuple[int, str, str, int]] = []
    for i, step in enumerate(steps):
        if step.inputs:
            _references(refs, i, step, index)
    asked = [(i, target) for i, _, _, target in refs if target >= 0]
    reached = iter(transitive_needs(needs, asked, order) if asked else [])
    ref_at = 0
    tasks = {name: registry.get(name) for name in {s.task for s in steps} if name in registry}
    hinted = False
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        task = tasks.get(step.task)
        if task is None and step.task:
            message = f"unknown task {step.task!r} in step {step.id!r}"
            if not hinted:
                hinted = True
                message += (
                    f" (known: {', '.join(registry.names())}; a @baton.task is known once its "
                    "module is imported: --import MODULE)"
                )
            problems.append(Problem(f"{where}.task", message))
        if typed is None or typed[i]:
            if task is None:
                if not step.task:
                    problems.append(Problem(f"{where}.task", f"step {step.id!r} names no task"))
            else:
                for message in task.check_inputs(step.inputs):
                    problems.append(Problem(f"{where}.with", f"{message} in step {step.id!r}"))
            for j, v in enumerate(step.validate_):
                for message in option_problems(v.kind, v.model_dump()):
                    problems.append(Problem(f"{where}.validate[{j}]", message))
        while ref_at < len(refs) and refs[ref_at][0] == i:
            _, loc, message, target = refs[ref_at]
            ref_at += 1
            if target < 0:
                problems.append(Problem(loc, message))
            elif not next(reached):
                named = steps[target].id
                unreached = f"step {step.id!r} references {named!r} but does not (transitively) need it"
                problems.append(Problem(loc, unreached))
    return problems


def _references(out: list[tuple[int, str, str, int]], i: int, step: Step, index: Mapping[str, int]) -> None:
    """Add each reference in step ``i``'s inputs to ``out``: where it is, and either what
    is wrong with it (and -1) or the index of the step it names."""
    for loc, text in iter_strings(plan_inputs(step.task, step.inputs), f"steps[{i}].with"):
        for expr in find_refs(text):
            try:
                ref = parse_ref(expr)
            except RefSyntaxError as exc:
                out.append((i, loc, str(exc), -1))
                continue
            target = index.get(ref.step)
            if target is None:
                out.append((i, loc, f"reference to unknown step {ref.step!r}", -1))
            else:
                out.append((i, loc, "", target))
