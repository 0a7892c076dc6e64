"""A goal as an interface receives it (REST ``POST /goals``, NATS ``execution.request``):
one model, so both check the same fields the same way."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from baton.agents.classify import LANGUAGES, check_language
from baton.errors import UsageError


class GoalContext(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workspace: str | None = Field(default=None, max_length=4096)
    target_file: str | None = Field(default=None, max_length=4096)
    context: str | None = Field(default=None, max_length=20_000)


class GoalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=20_000)
    language: str | None = Field(default=None, max_length=40, description=f"one of {', '.join(LANGUAGES)}")
    complexity: Literal["simple", "medium", "complex", "crisis"] | None = None
    context: GoalContext | None = None
    #: the sub-tasks of a template, or of a planner model
    decompose: Literal["template", "planner"] = "template"

    @field_validator("language")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        try:
            return check_language(value)
        except UsageError as exc:
            raise ValueError(exc.message) from None

    def context_values(self) -> dict[str, str] | None:
        return self.context.model_dump(exclude_none=True) if self.context is not None else None


__all__ = ["GoalContext", "GoalRequest"]
