"""The plan model: what a plan file says, as typed objects.

The same classes serve plans loaded from YAML/JSON and plans built in Python. Field names
follow the file format; ``with`` is spelled ``inputs`` in Python (``with`` is a keyword) and
both spellings are accepted.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STEP_ID_PATTERN = r"^[a-z0-9_-]+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, frozen=True)


class Complexity(StrEnum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"
    CRISIS = "crisis"


#: complexity -> (max_parallel, timeout_s); explicit values override these.
COMPLEXITY_PRESETS: dict[Complexity, tuple[int, float]] = {
    Complexity.SIMPLE: (1, 25.0),
    Complexity.MEDIUM: (2, 30.0),
    Complexity.COMPLEX: (3, 30.0),
    Complexity.CRISIS: (5, 20.0),
}

ROLES = ("coder", "tester", "critic", "admin")


class RetryPolicy(_Model):
    """How often a step is tried and how long to wait between tries."""

    attempts: int = Field(default=1, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    jitter: float = Field(default=0.2, ge=0, le=1)
    temperatures: list[float] | None = None

    def delay(self, failed_attempt: int, rand: float) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed.

        Exponential (backoff_s * 2**(n-1)), capped, with +/- ``jitter`` spread so that
        many failing steps do not retry in lockstep. ``rand`` is uniform in [0, 1).
        """
        base = min(self.backoff_s * 2.0 ** (failed_attempt - 1), self.max_backoff_s)
        return max(0.0, base * (1 + self.jitter * (2 * rand - 1)))


class Budget(_Model):
    """Spending limits for a run or a step, held by the LLM gateway.

    ``on_exhausted``: what a model call does when its estimate does not fit: ``fail`` the
    attempt (BudgetExceeded), answer from the ``cache`` only, or try a ``cheaper`` model
    among the configured fallbacks.
    """

    usd: float | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)
    on_exhausted: Literal["fail", "cache", "cheaper"] = "fail"


class Policy(_Model):
    """Run-wide defaults; explicit values override the complexity preset."""

    max_parallel: int | None = Field(default=None, ge=1, le=100_000)
    complexity: Complexity | None = None
    mode: Literal["single", "sequential", "parallel"] | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    run_timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None
    barrier: Literal["none", "wave"] = "none"
    #: confine the programs of its steps (baton.sandbox); always so for an API caller's run
    sandbox: bool = False

    def effective_max_parallel(self, default: int = 8) -> int:
        if self.max_parallel is not None:
            return self.max_parallel
        if self.mode in ("single", "sequential"):
            return 1
        if self.complexity is not None:
            return COMPLEXITY_PRESETS[self.complexity][0]
        return default

    def effective_timeout_s(self) -> float | None:
        if self.timeout_s is not None:
            return self.timeout_s
        if self.complexity is not None:
            return COMPLEXITY_PRESETS[self.complexity][1]
        return None


class Validator(_Model):
    """A check of a step's output; a failed check fails the attempt (and so retries)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str


class Step(_Model):
    """One task invocation inside a plan."""

    id: str = Field(pattern=STEP_ID_PATTERN, min_length=1, max_length=128)
    task: str = Field(min_length=1)
    needs: list[str] = Field(default_factory=list)
    inputs: dict[str, Any] = Field(default_factory=dict, alias="with")
    retry: RetryPolicy | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    role: Literal["coder", "tester", "critic", "admin"] | None = None
    validate_: list[Validator] = Field(default_factory=list, alias="validate")
    budget: Budget | None = None
    estimate_s: float | None = Field(default=None, ge=0)


class Plan(_Model):
    """A named DAG of steps with run-wide policy and budget."""

    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    budget: Budget | None = None
    policy: Policy = Field(default_factory=Policy)
    steps: list[Step]

    def to_dict(self) -> dict[str, Any]:
        """The plan in file form (``with``/``validate`` spellings), without defaults."""
        return self.model_dump(by_alias=True, exclude_defaults=True, mode="json")
