"""LLM tasks: steps that call a model through the gateway.

``llm.generate`` sends a prompt and returns the answer (or the code or JSON in it). Its
retries are the step's retries: each attempt runs at the step's temperature for that
attempt (``retry.temperatures``, 0.7, 0.5, 0.3, 0.3 by default), and when the previous
attempt was rejected — by a validator or by the extraction — the reason goes into the
next prompt. Every attempt records its prompt, answer, model, tokens and latency.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from baton.errors import TaskFailed
from baton.llm.context import DEFAULT_TOKENS, needs_context
from baton.llm.extract import extract_code
from baton.llm.gateway import BudgetGuard, CacheWrite, Gateway
from baton.llm.types import ChatRequest, Message
from baton.plan.refs import has_refs
from baton.tasks.registry import TaskContext, TaskDef

DEFAULT_TEMPERATURES = (0.7, 0.5, 0.3, 0.3)
EXTRACTS = ("text", "code", "json")


def feedback(previous_error: str) -> str:
    return f"\n\nYour previous answer was rejected:\n- {previous_error}\nAnswer again, fixing these problems."


def make_llm_tasks(gateway: Gateway) -> list[TaskDef]:
    """The LLM tasks of one engine, bound to its gateway."""

    async def generate(
        ctx: TaskContext,
        prompt: str,
        system: str | None = None,
        model: str | None = None,
        extract: str = "text",
        language: str | None = None,
        max_tokens: int | None = None,
        cache: bool = True,
        tier: str | None = None,
        context: bool = True,
        context_tokens: int = DEFAULT_TOKENS,
        rules: bool = True,
    ) -> dict[str, Any]:
        """Ask a model; the answer, or the code or JSON extracted from it.

        With ``context`` (the default), the outputs of the steps this one needs — at most
        three, the most relevant to the prompt first, within ``context_tokens`` — go into
        the system message, unless the prompt already quotes them.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskFailed("llm.generate: prompt must be a non-empty string")
        content = prompt + (feedback(ctx.previous_error) if ctx.previous_error else "")
        background = ""
        if context and ctx.needs:
            background, quoted = needs_context(await ctx.need_outputs(), prompt, max_tokens=context_tokens)
            if quoted:
                ctx.details["context"] = quoted
        system = "\n\n".join(part for part in (system, background) if part) or None
        messages = ([Message("system", system)] if system else []) + [Message("user", content)]
        plain = [*messages[:-1], Message("user", prompt)]
        temperature = ctx.temperature
        if temperature is None:
            temperature = DEFAULT_TEMPERATURES[min(ctx.attempt, len(DEFAULT_TEMPERATURES)) - 1]
        request = ChatRequest(
            messages=tuple(messages),
            temperature=temperature,
            max_tokens=max_tokens,
            step_id=ctx.step_id,
            attempt=ctx.attempt,
            use_cache=cache,
            use_rules=rules,
        )
        ctx.details.update(prompt=content, temperature=temperature)
        budget = BudgetGuard(ctx.run_id, ctx.step_id, ctx.run_budget, ctx.step_budget)
        # Routed by the plan's complexity; without one, by the estimate of the step's own
        # prompt (not of a retry's feedback, so that every attempt goes the same way).
        complexity = ctx.complexity
        estimated = gateway.estimate(replace(request, messages=tuple(plain)), model, tier, complexity)
        if estimated is not None:
            complexity = estimated.level
            ctx.details.update(complexity=estimated.level, complexity_reasons=list(estimated.reasons))
        writes: list[CacheWrite] = []  # the answer is cached once the step accepts it
        response = await gateway.complete(
            request, model, budget, tier=tier, complexity=complexity, deferred=writes
        )
        usage = response.usage.to_dict() if response.usage is not None else None
        ctx.details.update(
            answer=response.text,
            model=response.model,
            provider=response.provider,
            usage=usage,
            cost_usd=response.cost_usd,
            source=response.source,
            latency_s=round(response.latency_s, 4),
        )
        if "refused_matches" in response.raw:  # semantic matches the verifier said differ
            ctx.details["refused_matches"] = response.raw["refused_matches"]
            ctx.details["verify_cost_usd"] = response.raw["verify_cost_usd"]
        if "prompt_cache_saved_usd" in response.raw:  # the provider's own prompt cache
            ctx.details["prompt_cache_saved_usd"] = response.raw["prompt_cache_saved_usd"]
        if "budget" in response.raw:  # "within", or "downgraded" to a cheaper model
            ctx.details["budget"] = response.raw["budget"]
        if response.source == "cached":
            ctx.details["saved_usd"] = response.raw.get("saved_usd")
            ctx.details["cache"] = response.raw.get("cache")  # "exact" or "semantic"
            if response.raw.get("cache") == "semantic":  # the request it was taken for, how close
                ctx.details["similarity"] = response.raw.get("similarity")
                ctx.details["matched_prompt"] = response.raw.get("matched_prompt")
                if "verified_by" in response.raw:  # and the model that said they are the same
                    ctx.details["verified_by"] = response.raw["verified_by"]
                    ctx.details["verify_cost_usd"] = response.raw["verify_cost_usd"]
        result: dict[str, Any] = {
            "model": response.model,
            "usage": usage,
            "cost_usd": response.cost_usd,
            "source": response.source,
        }
        if extract == "code":
            result["text"] = extract_code(response.text, language)
        elif extract == "json":
            raw = extract_code(response.text, "json")
            try:
                result["value"] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TaskFailed(f"the answer is not JSON: {exc.msg} at line {exc.lineno}") from None
            result["text"] = raw
        else:
            result["text"] = response.text
        if writes:
            ctx.on_accepted.append(lambda: gateway.remember(writes))
        return result

    def check(inputs: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        model = inputs.get("model")
        if model is not None and not isinstance(model, str):
            problems.append("model must be a string")
        elif not (isinstance(model, str) and has_refs(model)):
            tier = inputs.get("tier")
            routed = model is None and (tier is not None or gateway.config.routing)
            if routed:
                named = tier if isinstance(tier, str) and not has_refs(tier) else None
                routes = [named] if named else sorted(set(gateway.config.routing.values()))
                problems += [p for t in routes for p in gateway.problems(None, t)]
            else:
                problems += gateway.problems(model)
        extract = inputs.get("extract", "text")
        if isinstance(extract, str) and not has_refs(extract) and extract not in EXTRACTS:
            problems.append(f"extract must be one of {', '.join(EXTRACTS)}, not {extract!r}")
        return problems

    # Its validators read the answer's text unless they say otherwise, and with validators
    # it gets an attempt per temperature of the schedule: a rejected answer is fed back.
    task = TaskDef.of(
        "llm.generate",
        generate,
        check=check,
        needs=("llm",),
        answer_field="text",
        checked_attempts=len(DEFAULT_TEMPERATURES),
    )
    return [task]
