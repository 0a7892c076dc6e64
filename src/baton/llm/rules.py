"""The first rung of the cost ladder: rules that answer without a model.

    rules:
      - {name: greeting, prompt: "(?i)^\\s*(hi|hello)\\b", answer: "Hello! What can I do for you?"}
      - {name: order-status, prompt: "order (?P<id>\\d+)", answer: "Order \\g<id> ships today."}
      - {name: version, prompt: "(?i)which version", handler: "myapp.rules:version"}

A rule matches when its ``prompt`` pattern is found in the request's user text; its
``answer`` is a template over the match's groups, or its ``handler`` (``module:function``,
called with the prompt and the match) computes one, or returns None to pass. The first
rule that answers wins; nothing is paid, and the result says ``autonomous``. Rules answer
a step's first attempt only: when that answer was rejected, the retry goes to a model.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from baton.llm.types import ChatRequest, ChatResponse, Usage

Handler = Callable[[str, "re.Match[str]"], Any]


class RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    #: a regular expression searched for in the request's user text
    prompt: str
    #: the answer, with \\1 or \\g<name> for the pattern's groups
    answer: str | None = None
    #: ``module:function(prompt, match) -> str | None`` computing the answer
    handler: str | None = None

    @field_validator("prompt")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_way_to_answer(self) -> RuleConfig:
        if (self.answer is None) == (self.handler is None):
            raise ValueError(f"rule {self.name!r} needs exactly one of answer and handler")
        if self.handler is not None and ":" not in self.handler:
            raise ValueError(f"rule {self.name!r}: handler must be 'module:function', not {self.handler!r}")
        return self


def load_handler(spec: str) -> Handler:
    """The function a ``module:function`` names; UsageError-worthy problems as ValueError."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no function {attr!r}")
    handler: Handler = fn
    return handler


def problems(rules: list[RuleConfig]) -> list[str]:
    """Handlers that cannot be loaded (found before a run starts)."""
    out = []
    for rule in rules:
        if rule.handler is not None:
            try:
                load_handler(rule.handler)
            except ValueError as exc:
                out.append(f"rule {rule.name!r}: {exc}")
    return out


class Rules:
    """The configured rules, compiled."""

    def __init__(self, rules: list[RuleConfig]) -> None:
        self._rules = [(rule, re.compile(rule.prompt)) for rule in rules]
        self._handlers: dict[str, Handler] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def answer(self, request: ChatRequest) -> ChatResponse | None:
        """The first rule's answer to ``request``, or None."""
        started = time.perf_counter()
        prompt = request.prompt
        for rule, pattern in self._rules:
            match = pattern.search(prompt)
            if match is None:
                continue
            if rule.answer is not None:
                text: Any = match.expand(rule.answer)
            else:
                assert rule.handler is not None
                handler = self._handlers.get(rule.handler)
                if handler is None:
                    handler = self._handlers[rule.handler] = load_handler(rule.handler)
                text = handler(prompt, match)
                if text is None:
                    continue
            return ChatResponse(
                text=str(text),
                model=f"rule:{rule.name}",
                usage=Usage(0, 0),
                latency_s=time.perf_counter() - started,
                provider="rules",
                raw={"rule": rule.name},
                cost_usd=0.0,
                source="autonomous",
            )
        return None


__all__ = ["RuleConfig", "Rules", "load_handler", "problems"]
