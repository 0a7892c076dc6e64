"""What a plan's model calls will cost, before it runs (``baton validate``).

Per ``llm.generate`` step: the least it can cost (one attempt, its prompt as written with
references counted empty, one output token, on the cheapest model the call may end on,
nothing from the cache), what to expect (its prompt and half its ``max_tokens``, on the
model it is routed to, discounted by the share of earlier calls the caches answered), and
the most (every attempt it may make, its prompt with the context of the steps it needs,
``max_tokens`` in full, on the dearest model it may end on). USD is None where a model's
price is not known. A plan whose least cost is more than its budget cannot finish: the
engine refuses it before it runs (unless its budget lets cached answers stand in).
"""

from __future__ import annotations

from dataclasses import dataclass

from baton.errors import Problem
from baton.llm import tokens
from baton.llm.context import DEFAULT_TOKENS
from baton.llm.gateway import BUDGET_OUTPUT_TOKENS, Gateway
from baton.llm.types import ChatRequest, Message, Usage
from baton.plan.model import Budget, Plan, Step
from baton.plan.refs import without_refs
from baton.tasks.registry import Registry, retry_policy

TASK = "llm.generate"


@dataclass(frozen=True, slots=True)
class Forecast:
    """Tokens and USD, at least / expected / at most (USD None: a price is not known)."""

    tokens_min: int = 0
    tokens_expected: int = 0
    tokens_max: int = 0
    usd_min: float | None = 0.0
    usd_expected: float | None = 0.0
    usd_max: float | None = 0.0
    #: the model the call is routed to (a step's; None for a plan's total)
    model: str | None = None

    def __add__(self, other: Forecast) -> Forecast:
        def add(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a + b

        return Forecast(
            self.tokens_min + other.tokens_min,
            self.tokens_expected + other.tokens_expected,
            self.tokens_max + other.tokens_max,
            add(self.usd_min, other.usd_min),
            add(self.usd_expected, other.usd_expected),
            add(self.usd_max, other.usd_max),
        )

    def to_dict(self) -> dict[str, object]:
        def usd(value: float | None) -> float | None:
            return None if value is None else round(value, 8)

        out: dict[str, object] = {
            "tokens": {"min": self.tokens_min, "expected": self.tokens_expected, "max": self.tokens_max},
            "usd": {"min": usd(self.usd_min), "expected": usd(self.usd_expected), "max": usd(self.usd_max)},
        }
        if self.model is not None:
            out["model"] = self.model
        return out


async def forecast_step(
    gateway: Gateway, registry: Registry, plan: Plan, step: Step, hit_rate: float = 0.0
) -> Forecast | None:
    """The forecast of one step (None: not a model call)."""
    if step.task != TASK:
        return None
    inputs = step.inputs
    model = inputs.get("model") if isinstance(inputs.get("model"), str) else None
    tier = inputs.get("tier") if isinstance(inputs.get("tier"), str) else None
    budgets = [b for b in (plan.budget, step.budget) if b is not None]
    cheaper = any(b.on_exhausted == "cheaper" for b in budgets)
    messages = [Message("user", without_refs(inputs.get("prompt")))]
    if inputs.get("system"):
        messages.insert(0, Message("system", without_refs(inputs.get("system"))))
    given = inputs.get("max_tokens")
    request = ChatRequest(tuple(messages), max_tokens=given if isinstance(given, int) and given > 0 else None)
    complexity = plan.policy.complexity
    candidates = await gateway.routes(model, tier, complexity, cheaper=cheaper, request=request)
    order = candidates[0]
    ends_on = list(dict.fromkeys(m for c in candidates for m in c))
    prompt = max(tokens.estimate_messages(messages, gateway.model_id(m)) for m in ends_on)
    context = (
        int(inputs.get("context_tokens") or DEFAULT_TOKENS)
        if step.needs and inputs.get("context", True)
        else 0
    )
    max_tokens = given if isinstance(given, int) and given > 0 else BUDGET_OUTPUT_TOKENS
    attempts = retry_policy(step, registry.find(step.task), plan.policy.retry).attempts
    expected_out = max(1, max_tokens // 2)
    least = Usage(prompt, 1)
    likely = Usage(prompt, expected_out)
    most = Usage(prompt + context, max_tokens)
    prices_min = [gateway.price(m, least) for m in ends_on]
    prices_max = [gateway.price(m, most) for m in ends_on]
    usd_likely = gateway.price(order[0], likely)
    miss = 1.0 - min(max(hit_rate, 0.0), 1.0)
    return Forecast(
        tokens_min=prompt + 1,
        tokens_expected=round(miss * (prompt + expected_out)),
        tokens_max=attempts * (prompt + context + max_tokens),
        usd_min=None if None in prices_min else min(p for p in prices_min if p is not None),
        usd_expected=None if usd_likely is None else miss * usd_likely,
        usd_max=None if None in prices_max else attempts * max(p for p in prices_max if p is not None),
        model=order[0],
    )


async def forecast_plan(
    gateway: Gateway, registry: Registry, plan: Plan, hit_rate: float = 0.0
) -> tuple[dict[str, Forecast], Forecast]:
    """Each model step's forecast by id, and the plan's total."""
    steps: dict[str, Forecast] = {}
    for step in plan.steps:
        found = await forecast_step(gateway, registry, plan, step, hit_rate)
        if found is not None:
            steps[step.id] = found
    total = Forecast()
    for found in steps.values():
        total = total + found
    return steps, total


def over_budget(plan: Plan, steps: dict[str, Forecast], total: Forecast) -> list[Problem]:
    """The budgets the plan's least cost does not fit (it cannot finish within them)."""
    problems: list[Problem] = []

    def check(where: str, budget: Budget | None, least: Forecast) -> None:
        if budget is None or budget.on_exhausted == "cache":
            return
        if budget.tokens is not None and least.tokens_min > budget.tokens:
            problems.append(
                Problem(
                    where,
                    f"its model calls need at least {least.tokens_min:,} tokens;"
                    f" the budget is {budget.tokens:,}",
                )
            )
        if budget.usd is not None and least.usd_min is not None and least.usd_min > budget.usd + 1e-12:
            problems.append(
                Problem(
                    where,
                    f"its model calls cost at least ${least.usd_min:.6f}; the budget is ${budget.usd:.6f}",
                )
            )

    check("budget", plan.budget, total)
    for i, step in enumerate(plan.steps):
        if step.id in steps:
            check(f"steps[{i}].budget", step.budget, steps[step.id])
    return problems


__all__ = ["Forecast", "forecast_plan", "forecast_step", "over_budget"]
