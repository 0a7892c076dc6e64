"""The task registry: named units of work and how to call them.

A task is a Python callable (sync or async). It receives a step's inputs as keyword
arguments; a parameter annotated with :class:`TaskContext` receives the attempt's context
(run and step ids, attempt number, idempotency key). Sync callables run in a worker thread
so that a blocking handler never stalls the engine.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from baton.errors import UnknownTask
from baton.plan.model import Budget, RetryPolicy, Step
from baton.sandbox import Confinement
from baton.tasks.threads import sync_threads

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler may know about the attempt it runs in."""

    run_id: str
    step_id: str
    attempt: int
    workdir: Path = field(default_factory=Path.cwd)
    #: this attempt's place in the step's temperature schedule (retry.temperatures).
    temperature: float | None = None
    #: why the previous attempt of this step failed (None on the first attempt).
    previous_error: str | None = None
    #: what the previous attempt recorded in its ``details`` (for example its issues).
    previous_details: dict[str, Any] | None = None
    #: what this attempt wants on record (JSON values): kept with the attempt, shown by
    #: ``baton show``, whether the attempt succeeds or fails.
    details: dict[str, Any] = field(default_factory=dict)
    #: the plan's budget and the step's, which model calls must stay within
    run_budget: Budget | None = None
    step_budget: Budget | None = None
    #: the plan's complexity (simple, medium, complex, crisis): model steps route by it
    complexity: str | None = None
    #: a confined step's workspace, user, programs and limits (baton.sandbox); None: the
    #: step runs as the server's user in ``workdir``
    confinement: Confinement | None = None
    #: what to do once the attempt is accepted (its output passed the step's validators):
    #: run by the executor, in order; a failure of one is logged, never the attempt's
    on_accepted: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    #: the steps this one needs, in the order of its ``needs``
    needs: tuple[str, ...] = ()
    #: reads the outputs of ``needs`` (set by the executor)
    load_needs: Callable[[], Awaitable[dict[str, Any]]] | None = field(default=None, repr=False)

    async def need_outputs(self) -> dict[str, Any]:
        """The outputs of the steps this one needs, by step id, in the order of ``needs``."""
        return await self.load_needs() if self.load_needs is not None else {}

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of the same step; pass it to the outside world."""
        return f"{self.run_id}:{self.step_id}"


def _is_context(annotation: Any) -> bool:
    """A TaskContext annotation, also as a string (``from __future__ import annotations``)."""
    if annotation is TaskContext:
        return True
    return isinstance(annotation, str) and annotation.rpartition(".")[2] == "TaskContext"


#: what a task may need of its machine: ``pure`` computes from its inputs, ``llm`` calls
#: models through the gateway, ``http`` reaches other hosts, ``shell`` and ``python`` run
#: any program or code, ``plan`` starts runs. baton.policy says which roles may use which.
CAPABILITIES = ("pure", "llm", "http", "shell", "python", "plan")

Estimator = Callable[[Mapping[str, Any]], float | None]
#: problems with a step's inputs that can be seen before the run starts
Checker = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True, slots=True)
class TaskDef:
    """A registered task."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    context_param: str | None
    params: frozenset[str]
    required: frozenset[str]
    takes_any: bool
    estimate: Estimator | None = None
    description: str = ""
    check: Checker | None = None
    #: what it needs (see CAPABILITIES); a task that declares nothing is ``pure``
    needs: frozenset[str] = frozenset({"pure"})
    #: the part of its output that validators read when they name no ``field`` (None: all)
    answer_field: str | None = None
    #: how many attempts a step of it with validators gets when it sets no retry policy
    checked_attempts: int = 1

    @classmethod
    def of(
        cls,
        name: str,
        fn: Callable[..., Any],
        estimate: Estimator | None = None,
        check: Checker | None = None,
        needs: Iterable[str] = ("pure",),
        answer_field: str | None = None,
        checked_attempts: int = 1,
    ) -> TaskDef:
        sig = inspect.signature(fn)
        context_param = None
        params: set[str] = set()
        required: set[str] = set()
        takes_any = False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                takes_any = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                continue
            if _is_context(p.annotation):
                context_param = p.name
                continue
            params.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
        doc = inspect.getdoc(fn) or ""
        return cls(
            name=name,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            context_param=context_param,
            params=frozenset(params),
            required=frozenset(required),
            takes_any=takes_any,
            estimate=estimate,
            description=doc.splitlines()[0] if doc else "",
            check=check,
            needs=_needs(name, needs),
            answer_field=answer_field,
            checked_attempts=checked_attempts,
        )

    def check_inputs(self, inputs: Mapping[str, Any]) -> list[str]:
        """Problems with the input names (values are checked by the handler at run time)."""
        problems = self.check(inputs) if self.check is not None else []
        if self.takes_any and not self.required:
            return problems
        problems += [f"missing input {name!r}" for name in sorted(self.required - inputs.keys())]
        if not self.takes_any:
            takes = ", ".join(sorted(self.params)) or "nothing"
            problems += [
                f"unknown input {name!r} (task {self.name} takes: {takes})"
                for name in sorted(set(inputs) - self.params)
            ]
        return problems

    async def invoke(self, inputs: Mapping[str, Any], ctx: TaskContext | None = None) -> Any:
        """Call the handler; ``ctx`` is required when the handler takes a TaskContext."""
        kwargs: Mapping[str, Any] = inputs
        if self.context_param is not None:
            if ctx is None:
                raise TypeError(f"task {self.name} needs a TaskContext")
            kwargs = {**inputs, self.context_param: ctx}
        if self.is_async:
            return await self.fn(**kwargs)
        return await sync_threads.run(self.fn, kwargs)  # daemon threads: never hold an exit


def _needs(name: str, needs: Iterable[str]) -> frozenset[str]:
    declared = frozenset(needs)
    unknown = sorted(declared - set(CAPABILITIES))
    if unknown or not declared:
        known = ", ".join(CAPABILITIES)
        raise ValueError(f"task {name}: needs must be some of {known}, not {unknown or '[]'}")
    return declared


_catalogue: dict[str, TaskDef] = {}


@overload
def task(fn: F, /) -> F: ...
@overload
def task(
    *, name: str | None = None, estimate: Estimator | None = None, needs: Iterable[str] = ("pure",)
) -> Callable[[F], F]: ...
def task(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    estimate: Estimator | None = None,
    needs: Iterable[str] = ("pure",),
) -> F | Callable[[F], F]:
    """Declare a Python callable as a task; engines created afterwards can run it.

    The name defaults to ``module.function``; ``estimate`` optionally predicts a run time
    in seconds from the inputs, which the scheduler uses to order ready steps; ``needs``
    says what it uses (see CAPABILITIES: ``("http",)`` for a task that calls other hosts),
    which decides who may run it through the API (baton.policy).
    """
    declared = tuple(needs)

    def register(f: F) -> F:
        task_name = name or f"{f.__module__}.{f.__qualname__}"
        _catalogue[task_name] = TaskDef.of(task_name, f, estimate, needs=declared)
        return f

    return register(fn) if fn is not None else register


class Registry:
    """The tasks one engine can run: built-ins, ``@task`` declarations, explicit additions."""

    def __init__(self, tasks: Iterable[TaskDef] = ()) -> None:
        self._tasks: dict[str, TaskDef] = {}
        self.extend(tasks)

    def extend(self, tasks: Iterable[TaskDef]) -> None:
        """Add (or replace) task definitions."""
        for t in tasks:
            self._tasks[t.name] = t

    @classmethod
    def default(cls) -> Registry:
        from baton.tasks.builtins import BUILTINS
        from baton.tasks.http import http_task
        from baton.tasks.intents import INTENTS

        return cls([*BUILTINS, http_task(), *INTENTS, *_catalogue.values()])

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        estimate: Estimator | None = None,
        needs: Iterable[str] = ("pure",),
    ) -> TaskDef:
        task_name = name or f"{fn.__module__}.{fn.__qualname__}"
        definition = TaskDef.of(task_name, fn, estimate, needs=needs)
        self._tasks[task_name] = definition
        return definition

    def refresh(self) -> None:
        """Pick up ``@task`` declarations made since the registry was built."""
        for t in _catalogue.values():
            self._tasks.setdefault(t.name, t)

    def get(self, name: str) -> TaskDef:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(f"unknown task {name!r}") from None

    def find(self, name: str) -> TaskDef | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def names(self) -> list[str]:
        return sorted(self._tasks)


def retry_policy(step: Step, task: TaskDef | None, plans: RetryPolicy | None) -> RetryPolicy:
    """A step's retry policy: its own, the plan's, or, for a checked step of a task that
    retries with feedback (llm.generate), that task's number of attempts; else one try."""
    if step.retry is not None:
        return step.retry
    if plans is None and step.validate_ and task is not None and task.checked_attempts > 1:
        return RetryPolicy(attempts=task.checked_attempts)
    return plans or RetryPolicy()
