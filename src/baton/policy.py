"""Who may run what: capabilities by role, for the plans and calls of API callers.

Every task declares what it needs (``baton.tasks.registry.CAPABILITIES``: pure, llm,
http, shell, python, plan), and so do two validators (``python`` runs code, ``command`` a
program). A step runs under a role (``coder``, ``tester``, ``critic``, ``admin``), the one
it names or, by default, the first one its caller's key may grant; the role's
capabilities must cover every need of the step, or the plan is refused before anything is
written, each offending step named.

By default an operator key grants ``coder``, ``tester`` and ``critic``, which may run
pure, llm and http tasks and the user tasks the server registers (pure unless they
declare more), never ``shell``, ``python`` or those validators; an admin key grants
``admin`` too, which may use everything. A policy file changes that::

    roles:
      tester:                                 # tests may run these programs
        capabilities: [pure, llm, http, shell]
        programs: [pytest, make, git]         # by name, on PATH; "*": any
        limits: {cpu_s: 1800, memory_mb: 8192}  # the most a step may ask for
    keys:
      operator: [coder, tester, critic]       # the first is the default

The steps of a key holder's run are confined (:mod:`baton.sandbox`): ``programs`` is what
a role may start (without it: any program but shells and interpreters), ``limits`` the
maxima of the resource limits its steps may ask for (default :data:`DEFAULT_LIMITS`).

Callers on the local machine (the command line, the Python API) are not checked: they
can already run anything as themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from baton.errors import Problem, UsageError
from baton.plan.model import Plan, Step
from baton.plan.refs import has_refs
from baton.sandbox import DEFAULT_LIMITS, DEFAULT_TIMEOUT_S, NO_MAXIMA, Confinement, limit_problems
from baton.tasks.registry import CAPABILITIES, Registry

#: the step roles a plan may name (baton.plan.model.Step.role)
STEP_ROLES = ("coder", "tester", "critic", "admin")
KEY_ROLES = ("viewer", "operator", "admin")
#: what the validators that run things need
VALIDATOR_NEEDS = {"python": "python", "command": "shell"}

_SAFE = frozenset({"pure", "llm", "http"})
DEFAULT_ROLES: dict[str, frozenset[str]] = {
    "coder": _SAFE,
    "tester": _SAFE,
    "critic": frozenset({"pure", "llm"}),
    "admin": frozenset(CAPABILITIES),
}
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "viewer": (),
    "operator": ("coder", "tester", "critic"),
    "admin": ("admin", "coder", "tester", "critic"),
}


#: the programs each role may start in a confined step (None: any but interpreters)
DEFAULT_PROGRAMS: dict[str, tuple[str, ...] | None] = {"admin": ("*",)}


@dataclass(frozen=True, slots=True)
class Policy:
    """Capabilities by step role, and the step roles each key role may grant; for
    confined steps, the programs each role may start and its limits' maxima."""

    roles: Mapping[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_KEYS))
    programs: Mapping[str, tuple[str, ...] | None] = field(default_factory=lambda: dict(DEFAULT_PROGRAMS))
    maxima: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """The defaults, with what the file at ``path`` says instead (UsageError if bad)."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read the policy {path}: {exc}") from None
        return cls.of(data, str(path))

    @classmethod
    def of(cls, data: Any, source: str = "policy") -> Policy:
        if not isinstance(data, dict) or set(data) - {"roles", "keys"}:
            raise UsageError(f"{source}: a policy is a mapping with 'roles' and 'keys'")
        roles = dict(DEFAULT_ROLES)
        programs = dict(DEFAULT_PROGRAMS)
        maxima: dict[str, Mapping[str, int]] = {}
        for name, spec in (data.get("roles") or {}).items():
            caps = spec.get("capabilities") if isinstance(spec, dict) else None
            if name not in STEP_ROLES or not isinstance(caps, list):
                raise UsageError(
                    f"{source}: roles.{name}: a role is one of {', '.join(STEP_ROLES)}"
                    " with a list of capabilities"
                )
            assert isinstance(spec, dict)
            unknown = sorted(set(map(str, caps)) - set(CAPABILITIES)) + sorted(
                set(spec) - {"capabilities", "programs", "limits"}
            )
            if unknown:
                raise UsageError(f"{source}: roles.{name}: unknown capabilities or settings {unknown}")
            roles[name] = frozenset(map(str, caps))
            if "programs" in spec:
                listed = spec["programs"]
                bad = (
                    [p for p in listed if not isinstance(p, str) or not p]
                    if isinstance(listed, list)
                    else [listed]
                )
                if bad:
                    raise UsageError(
                        f"{source}: roles.{name}.programs: a list of program names or paths, which"
                        f" {', '.join(map(repr, bad))} is not (quote a name YAML reads as something else)"
                    )
                programs[name] = tuple(listed)
            if "limits" in spec:
                problems = limit_problems(spec["limits"], NO_MAXIMA)
                if problems:
                    raise UsageError(f"{source}: roles.{name}.limits: {'; '.join(problems)}")
                maxima[name] = {**DEFAULT_LIMITS, **spec["limits"]}
        keys = dict(DEFAULT_KEYS)
        for name, grants in (data.get("keys") or {}).items():
            if name not in KEY_ROLES or not isinstance(grants, list) or not set(grants) <= set(STEP_ROLES):
                raise UsageError(
                    f"{source}: keys.{name}: a key role ({', '.join(KEY_ROLES)}) grants a list of"
                    f" step roles ({', '.join(STEP_ROLES)})"
                )
            keys[name] = tuple(grants)
        return cls(roles, keys, programs, maxima)

    def check_plan(
        self, plan: Plan, registry: Registry, key_role: str, *, grants: tuple[str, ...] | None = None
    ) -> list[Problem]:
        """What in ``plan`` a caller with a ``key_role`` key may not run (empty: all of it);
        ``grants``: the step roles it may use, where not the key role's (a sub-run of a
        confined step gets its step's role only)."""
        if grants is None:
            grants = self.keys.get(key_role, ())
        problems: list[Problem] = []
        for i, step in enumerate(plan.steps):
            where = f"steps[{i}]"
            role = step.role or (grants[0] if grants else None)
            if role is None or role not in grants:
                asked = f"role {role!r}" if role else "any role"
                problems.append(Problem(where, f"step {step.id!r}: {_a(key_role)} key may not grant {asked}"))
                continue
            needs = self._needs(step.task, registry)
            needs |= {VALIDATOR_NEEDS[v.kind] for v in step.validate_ if v.kind in VALIDATOR_NEEDS}
            missing = sorted(needs - self.roles.get(role, frozenset()))
            if missing:
                problems.append(
                    Problem(
                        where,
                        f"step {step.id!r} needs {', '.join(missing)} (task {step.task!r}"
                        f"{_validators(step.validate_)}), which role {role!r} may not use",
                    )
                )
                continue
            confinement = self.confinement(role, Path("/"), None)
            problems += [
                Problem(where, f"step {step.id!r}: {p}") for p in _program_problems(step, confinement)
            ]
        return problems

    def confinement(
        self,
        role: str | None,
        workspace: Path,
        user: tuple[int, int] | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Confinement:
        """What a confined step of ``role`` runs in (None: a local plan's, which may
        start any program)."""
        maxima = self.maxima.get(role, DEFAULT_LIMITS) if role else DEFAULT_LIMITS
        limits = {name: min(value, maxima.get(name, value)) for name, value in DEFAULT_LIMITS.items()}
        programs = self.programs.get(role) if role else ("*",)
        return Confinement(workspace, user, programs, limits, maxima, timeout_s, role=role)

    def check_task(self, task: str, registry: Registry, key_role: str) -> list[Problem]:
        """Whether a caller with a ``key_role`` key may call ``task`` directly (as a job)."""
        grants = self.keys.get(key_role, ())
        needs = self._needs(task, registry)
        if any(needs <= self.roles.get(role, frozenset()) for role in grants):
            return []
        return [
            Problem(
                "task",
                f"task {task!r} needs {', '.join(sorted(needs))}, which {_a(key_role)} key may not use",
            )
        ]

    def job_role(self, task: str, registry: Registry, key_role: str) -> str | None:
        """The step role a ``key_role`` key holder's job of ``task`` runs under: the first
        its key grants that may run the task (None: none may)."""
        needs = self._needs(task, registry)
        grants = self.keys.get(key_role, ())
        return next((role for role in grants if needs <= self.roles.get(role, frozenset())), None)

    @staticmethod
    def _needs(task: str, registry: Registry) -> set[str]:
        definition = registry.find(task)
        return set(definition.needs) if definition is not None else {"pure"}


def _program_problems(step: Step, confinement: Confinement) -> list[str]:
    """What the programs a step names (when written out, not references) may not run."""
    found: list[str] = []
    if step.task == "shell":
        argv, limits = step.inputs.get("argv"), step.inputs.get("limits")
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and not has_refs(argv[0]):
            found += confinement.check(argv[0])
        if limits is not None and not has_refs(limits):
            found += limit_problems(limits, confinement.maxima)
    for validator in step.validate_:
        argv = (validator.model_extra or {}).get("argv")
        if validator.kind == "command" and isinstance(argv, list) and argv and isinstance(argv[0], str):
            found += [f"command validator: {p}" for p in confinement.check(argv[0])]
    return found


def _a(role: str) -> str:
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"


def _validators(validators: Any) -> str:
    kinds = [v.kind for v in validators if v.kind in VALIDATOR_NEEDS]
    return f", validators {', '.join(kinds)}" if kinds else ""


__all__ = ["DEFAULT_KEYS", "DEFAULT_PROGRAMS", "DEFAULT_ROLES", "KEY_ROLES", "STEP_ROLES", "Policy"]
