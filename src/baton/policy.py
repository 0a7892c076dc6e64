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
      tester: {capabilities: [pure, llm, http, shell]}   # tests may run programs
    keys:
      operator: [coder, tester, critic]                  # the first is the default

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
from baton.plan.model import Plan
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


@dataclass(frozen=True, slots=True)
class Policy:
    """Capabilities by step role, and the step roles each key role may grant."""

    roles: Mapping[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_KEYS))

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
        for name, spec in (data.get("roles") or {}).items():
            caps = spec.get("capabilities") if isinstance(spec, dict) else None
            if name not in STEP_ROLES or not isinstance(caps, list):
                raise UsageError(
                    f"{source}: roles.{name}: a role is one of {', '.join(STEP_ROLES)}"
                    " with a list of capabilities"
                )
            unknown = sorted(set(map(str, caps)) - set(CAPABILITIES))
            if unknown:
                raise UsageError(f"{source}: roles.{name}: unknown capabilities {unknown}")
            roles[name] = frozenset(map(str, caps))
        keys = dict(DEFAULT_KEYS)
        for name, grants in (data.get("keys") or {}).items():
            if name not in KEY_ROLES or not isinstance(grants, list) or not set(grants) <= set(STEP_ROLES):
                raise UsageError(
                    f"{source}: keys.{name}: a key role ({', '.join(KEY_ROLES)}) grants a list of"
                    f" step roles ({', '.join(STEP_ROLES)})"
                )
            keys[name] = tuple(grants)
        return cls(roles, keys)

    def check_plan(self, plan: Plan, registry: Registry, key_role: str) -> list[Problem]:
        """What in ``plan`` a caller with a ``key_role`` key may not run (empty: all of it)."""
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
        return problems

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

    @staticmethod
    def _needs(task: str, registry: Registry) -> set[str]:
        definition = registry.find(task)
        return set(definition.needs) if definition is not None else {"pure"}


def _a(role: str) -> str:
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"


def _validators(validators: Any) -> str:
    kinds = [v.kind for v in validators if v.kind in VALIDATOR_NEEDS]
    return f", validators {', '.join(kinds)}" if kinds else ""


__all__ = ["DEFAULT_KEYS", "DEFAULT_ROLES", "KEY_ROLES", "STEP_ROLES", "Policy"]
