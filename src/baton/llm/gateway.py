"""The gateway: the one path of every model call.

rules (deterministic answers, first attempts only) → cache (exact, then semantic where
configured) → budget → provider (retries of transient
errors honouring Retry-After, bounded; then the next configured model) → accounting
(tokens, cost from the price table) → settle.
The exact cache and the budget ledger live in the store, so every run and worker on the
database shares them: a call reserves its estimate against the run's and the step's
budgets in one transaction before it goes out (parallel calls cannot overspend together),
and settles what it really used after. Tier routing plugs in here. The semantic cache's
directory of earlier requests lives in the same cache rows (see :mod:`baton.llm.semantic`);
its model loads on the first lookup of a gateway whose config enables it, never otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from baton.errors import BudgetExceeded, UsageError
from baton.llm import tokens
from baton.llm.complexity import Estimate
from baton.llm.complexity import estimate as estimate_complexity
from baton.llm.config import HOSTED, SEMANTIC_EXTRA, LLMConfig, semantic_extra_installed
from baton.llm.prices import PriceBook
from baton.llm.providers.anthropic import AnthropicMessages
from baton.llm.providers.base import Provider
from baton.llm.providers.openai import OpenAIChat
from baton.llm.providers.scripted import RecordingProvider, ScriptedProvider
from baton.llm.rules import Rules
from baton.llm.types import ChatRequest, ChatResponse, Message, ProviderError, Usage
from baton.plan.model import Budget
from baton.store.base import BudgetClaim, BudgetSettle, Store

if TYPE_CHECKING:
    from baton.llm.semantic import Embedded, SemanticIndex

BACKOFF_S = 0.5
#: the output a call may produce when the step names no max_tokens and a budget applies
BUDGET_OUTPUT_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class BudgetGuard:
    """The budgets one call is held to."""

    run_id: str
    step_id: str
    run: Budget | None = None
    step: Budget | None = None

    @property
    def scopes(self) -> list[tuple[str, Budget]]:
        out = []
        if self.run is not None and (self.run.tokens is not None or self.run.usd is not None):
            out.append(("run", self.run))
        if self.step is not None and (self.step.tokens is not None or self.step.usd is not None):
            out.append((f"step:{self.step_id}", self.step))
        return out

    @property
    def on_exhausted(self) -> str:
        policies = [b.on_exhausted for _, b in self.scopes]
        return policies[-1] if policies else "fail"  # the step's word over the run's


@dataclass(frozen=True, slots=True)
class _Reservation:
    settles: list[tuple[str, int, float]]


#: what a cache entry's ``v`` says: the answer was accepted (a step's passed its validators)
#: before it went in. Entries without it, from before, may be rejected answers: never served.
CACHE_VERSION = 2


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """A model's answer to put in the cache once it is accepted (Gateway.remember)."""

    key: str
    response: ChatResponse
    #: the semantic index's (scope, embedding) of the request, when it has one
    probe: tuple[str, Embedded] | None = None


def _total_cost(responses: list[ChatResponse]) -> float | None:
    costs = [r.cost_usd for r in responses]
    return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)


def cache_key(model: str, request: ChatRequest) -> str:
    """The exact-cache key: the model asked, the messages and the sampling parameters."""
    canonical = {
        "model": model,
        "messages": [[m.role, m.content] for m in request.messages],
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def semantic_scope(model: str, request: ChatRequest) -> tuple[str, str] | None:
    """What the semantic cache compares: (the scope, the last user message), or None.

    The scope is everything else that must be equal: the model asked, the sampling
    parameters, and the conversation around the last user message.
    """
    last = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=None)
    if last is None or not request.messages[last].content.strip():
        return None
    canonical = {
        "model": model,
        "around": [[m.role, None if i == last else m.content] for i, m in enumerate(request.messages)],
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    scope = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    return scope, request.messages[last].content


class Gateway:
    """Calls models by their configured names."""

    def __init__(self, config: LLMConfig | None = None, store: Store | None = None) -> None:
        self.config = config or LLMConfig()
        self.prices = PriceBook(self.config.prices)
        self.store = store
        self._providers: dict[str, Provider] = {}
        self._cooling: dict[str, float] = {}  # model -> monotonic time it may be tried again
        self._semantic: SemanticIndex | None = None
        self._rules = Rules(self.config.rules)
        #: told (run id, what) when a call used more than it reserved (the engine emits a
        #: ``budget.overrun`` event)
        self.on_overrun: Callable[[str, dict[str, object]], None] | None = None

    def problems(self, model: str | None, tier: str | None = None) -> list[str]:
        return self.config.problems(model, tier)

    def _provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            provider = self._build(name)
            self._providers[name] = provider
        return provider

    def _build(self, name: str) -> Provider:
        problems = self.config.problems(name)
        if problems:
            raise ProviderError("; ".join(problems))
        spec = self.config.models[name]
        env = spec.key_env()
        key = os.environ.get(env) if env else None
        model = spec.model or name
        if spec.provider == "scripted":
            assert spec.cassette is not None  # problems() said so
            cassette = self.config.resolve(spec.cassette)
            if spec.record_from is not None:
                return RecordingProvider(name=name, inner=self._provider(spec.record_from), cassette=cassette)
            return ScriptedProvider(name=name, cassette=cassette, model=model)
        base_url = spec.base_url or HOSTED[spec.provider][0]
        if spec.provider == "openai":
            return OpenAIChat(
                name=name, base_url=base_url, model=model, api_key=key, timeout_s=spec.timeout_s
            )
        return AnthropicMessages(
            name=name,
            base_url=base_url,
            model=model,
            api_key=key,
            timeout_s=spec.timeout_s,
            prompt_cache=spec.prompt_cache,
        )

    async def complete(
        self,
        request: ChatRequest,
        model: str | None = None,
        budget: BudgetGuard | None = None,
        *,
        tier: str | None = None,
        complexity: str | None = None,
        deferred: list[CacheWrite] | None = None,
    ) -> ChatResponse:
        """Answer ``request``: by a rule, from the cache, or from a model (named, or routed)
        within budget.

        A model's answer goes into the cache at once, or, given ``deferred``, is added to
        it for the caller to :meth:`remember` once the answer is accepted (a step's: once it
        passed the step's validators), so that a rejected answer never answers again.

        Routing: a named ``model`` (then its fallbacks); else the models of ``tier``, or of
        the tier the config routes ``complexity`` to, one tier cheaper once the run has
        spent ``downgrade_at`` of a budget; else the default model.
        """
        if self._rules and request.use_rules and request.attempt == 1:
            answered = self._rules.answer(request)
            if answered is not None:
                return answered
        guard = budget if budget is not None and budget.scopes else None
        estimated = self.estimate(request, model, tier, complexity)
        if estimated is not None:
            complexity = estimated.level
        order, tightened = await self._route(model, tier, complexity, guard)
        first = order[0]
        key = None
        probe: tuple[str, Embedded] | None = None
        verified: list[ChatResponse] = []  # semantic matches the verifier refused
        consult = request.use_cache or (guard is not None and guard.on_exhausted == "cache")
        cache = self.config.cache
        if self.store is not None and (cache.exact or cache.semantic is not None) and consult:
            key = cache_key(first, request)
            hit = await self._cached(key, "exact") if cache.exact else None
            if hit is None and cache.semantic is not None:
                hit, probe, verified = await self._semantic_lookup(first, request, guard)
            if hit is not None:
                return hit
        if guard is not None and request.max_tokens is None:
            request = replace(request, max_tokens=BUDGET_OUTPUT_TOKENS)
        order, response = await self._within_budget(guard, order, request)
        if order[0] != first:  # the budget sent it to a cheaper model
            response = replace(response, source="fallback")
        if guard is not None:  # what the budget decided, for the step's record and its event
            decision = "downgraded" if tightened or order[0] != first else "within"
            response = replace(response, raw={**response.raw, "budget": decision})
        if key is not None:
            write = CacheWrite(key, response, probe)
            if deferred is not None:
                deferred.append(write)
            else:
                await self.remember([write])
        if estimated is not None:  # how it was routed, for the step's record
            raw = {
                **response.raw,
                "complexity": estimated.level,
                "complexity_reasons": list(estimated.reasons),
            }
            response = replace(response, raw=raw)
        if verified:  # what asking the verifier cost is this call's too
            spent = _total_cost([response, *verified])
            raw = {**response.raw, "verify_cost_usd": _total_cost(verified), "refused_matches": len(verified)}
            response = replace(response, cost_usd=spent, raw=raw)
        return response

    async def remember(self, writes: list[CacheWrite]) -> None:
        """Put accepted answers in the exact cache, and index them for the semantic one."""
        for write in writes:
            await self._remember(write.key, write.response)
            if write.probe is not None:
                assert self._semantic is not None
                await self._semantic.add(write.probe[0], write.probe[1], write.key)

    async def _semantic_lookup(
        self, first: str, request: ChatRequest, guard: BudgetGuard | None = None
    ) -> tuple[ChatResponse | None, tuple[str, Embedded] | None, list[ChatResponse]]:
        """An answer to an earlier request that asks the same; else what to index this one by."""
        assert self.store is not None and self.config.cache.semantic is not None
        scoped = semantic_scope(first, request)
        if scoped is None:
            return None, None, []
        if self._semantic is None:
            if not semantic_extra_installed():
                raise UsageError(f"cache.semantic: {SEMANTIC_EXTRA}")
            from baton.llm.semantic import SemanticIndex

            semantic = self.config.cache.semantic
            self._semantic = SemanticIndex(
                store=self.store,
                threshold=semantic.threshold,
                guarded=semantic.guard,
                max_entries=semantic.max_entries,
                ttl_s=self.config.cache.ttl_s,
            )
        scope, text = scoped
        embedded = await self._semantic.probe(text)
        if embedded is None:  # too long for the model to read whole
            return None, None, []
        verify = self.config.cache.semantic.verify
        checks: list[ChatResponse] = []  # the verifier's answers, whatever they said
        for match in await self._semantic.matches(scope, embedded):
            hit = await self._cached(match.key, "semantic")
            if hit is None:
                continue
            raw = {**hit.raw, "similarity": match.similarity, "matched_prompt": match.prompt}
            if verify is not None:
                same, check = await self._verify(verify, text, match.prompt, guard)
                checks.append(check)
                if not same:
                    continue
                raw.update(verified_by=check.model, verify_cost_usd=_total_cost(checks))
                return replace(hit, raw=raw, cost_usd=_total_cost(checks)), None, checks
            return replace(hit, raw=raw), None, checks
        return None, (scope, embedded), checks

    async def _verify(
        self, verify: str, new: str, earlier: str, guard: BudgetGuard | None
    ) -> tuple[bool, ChatResponse]:
        """Ask the ``verify`` model (or tier) whether ``new`` asks what ``earlier`` did; its
        call is held to the step's budget like any other."""
        question = (
            "Do these two requests ask for exactly the same thing, so that one answer serves "
            f"both? Answer yes or no.\n\nRequest A: {earlier}\n\nRequest B: {new}"
        )
        request = ChatRequest(messages=(Message("user", question),), temperature=0.0, max_tokens=3)
        model, tier = (verify, None) if verify in self.config.models else (None, verify)
        order, _ = await self._route(model, tier, None, None)
        _, answer = await self._within_budget(guard, order, request)
        return answer.text.strip().lower().startswith("yes"), answer

    async def _within_budget(
        self, guard: BudgetGuard | None, order: list[str], request: ChatRequest
    ) -> tuple[list[str], ChatResponse]:
        """Call the models of ``order`` (or cheaper ones, as the budget says) with the call
        reserved before and settled after; the models tried, and the answer."""
        reservation = None
        if guard is not None:
            order, reservation = await self._reserve(guard, order, request)
        try:
            response = await self._call(order, request)
        except BaseException:
            if reservation is not None:
                await self._settle(guard, reservation, None)
            raise
        if reservation is not None:
            await self._settle(guard, reservation, response)
        return order, response

    def _chain(self, first: str) -> list[str]:
        order = [first]
        for name in order:  # grows as fallbacks are discovered
            spec = self.config.models.get(name)
            for fallback in spec.fallbacks if spec is not None else []:
                if fallback not in order:
                    order.append(fallback)
        return order

    def estimate(
        self, request: ChatRequest, model: str | None, tier: str | None, complexity: str | None
    ) -> Estimate | None:
        """The complexity ``request`` is routed by when the caller names no model, tier or
        complexity and the config routes by complexity (None: it is not estimated)."""
        if model is not None or tier is not None or complexity is not None:
            return None
        if not (self.config.routing and self.config.estimate_complexity):
            return None
        return estimate_complexity(request)

    async def routes(
        self,
        model: str | None,
        tier: str | None,
        complexity: str | None,
        *,
        cheaper: bool = False,
        request: ChatRequest | None = None,
    ) -> list[list[str]]:
        """The orders of models a call may try (with ``cheaper``: and those on_exhausted:
        cheaper would try next), as routed without a budget's say; given ``request``, with
        its complexity estimated when none is given."""
        estimated = self.estimate(request, model, tier, complexity) if request is not None else None
        if estimated is not None:
            complexity = estimated.level
        order, _ = await self._route(model, tier, complexity, None)
        return [order, *self._cheaper(order)] if cheaper else [order]

    def price(self, name: str, usage: Usage) -> float | None:
        """What ``usage`` costs on the configured model ``name`` (None: price unknown)."""
        return self._estimate_usd(name, usage)

    def model_id(self, name: str) -> str:
        return self._model_id(name)

    def _model_id(self, name: str) -> str:
        """The provider's name of a configured model (what its tokenizer family is known by)."""
        spec = self.config.models.get(name)
        return (spec.model if spec is not None else None) or name

    def _estimate_usd(self, name: str, usage: Usage) -> float | None:
        spec = self.config.models.get(name)
        hint = spec.provider if spec is not None and spec.provider != "scripted" else None
        return self.prices.cost_usd(self._model_id(name), usage, hint)

    async def _reserve(
        self, guard: BudgetGuard, order: list[str], request: ChatRequest
    ) -> tuple[list[str], _Reservation]:
        """Reserve the call's estimate; the models to try (cheaper ones if the policy says so)."""
        assert self.store is not None, "budgets need a store"
        output_tokens = request.max_tokens or BUDGET_OUTPUT_TOKENS
        candidates = [order]
        if guard.on_exhausted == "cheaper":
            candidates += self._cheaper(order)
        refusal: BudgetExceeded | None = None
        for candidate in candidates:
            # Counted by a real tokenizer, with the margin of the model family that counts most.
            prompt_tokens = max(
                tokens.estimate_messages(request.messages, self._model_id(m)) for m in candidate
            )
            estimate = Usage(prompt_tokens, output_tokens)
            total_tokens = prompt_tokens + output_tokens
            # A call may end on any model it may try: reserve the dearest of them.
            costs = [self._estimate_usd(m, estimate) for m in candidate]
            usd = None if any(c is None for c in costs) else max(c for c in costs if c is not None)
            claims = []
            for scope, budget in guard.scopes:
                if budget.usd is not None and usd is None:
                    raise BudgetExceeded(
                        f"{scope} has a USD budget, but the price of model {candidate[0]!r} (or a fallback) "
                        "is unknown: add it under prices: in the LLM config"
                    )
                claims.append(BudgetClaim(scope, total_tokens, usd or 0.0, budget.tokens, budget.usd))
            try:
                await self._reserve_waiting(guard.run_id, claims)
            except BudgetExceeded as exc:
                refusal = refusal or exc
                continue
            return candidate, _Reservation([(c.scope, c.tokens, c.usd) for c in claims])
        assert refusal is not None
        if guard.on_exhausted == "cache":
            raise BudgetExceeded(f"{refusal.message}; and no cached answer to this request") from None
        raise refusal

    def _cheaper(self, order: list[str]) -> list[list[str]]:
        """What ``on_exhausted: cheaper`` tries after ``order``: its later models (its
        fallbacks), then each configured tier cheaper than the one its first model is in."""
        found = [order[at:] for at in range(1, len(order))]
        names = list(self.config.tiers)
        start = next((t for t in names if order[0] in self.config.tiers[t]), None)
        if start is None:
            return found
        for lower in reversed(names[: names.index(start)]):
            chain: list[str] = []
            for name in self.config.tiers[lower]:
                chain += [m for m in self._chain(name) if m not in chain]
            if chain and chain not in found and chain != order:
                found.append(chain)
        return found

    async def _reserve_waiting(self, run_id: str, claims: list[BudgetClaim]) -> None:
        """Reserve ``claims``; when they do not fit only because of other calls'
        reservations in flight, wait (at most ``budget_wait_s``) for those to settle."""
        assert self.store is not None
        deadline, pause = time.monotonic() + self.config.budget_wait_s, 0.02
        while True:
            try:
                await self.store.budget_reserve(run_id, claims)
                return
            except BudgetExceeded:
                if time.monotonic() + pause > deadline or not await self._fits_once_settled(run_id, claims):
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    async def _fits_once_settled(self, run_id: str, claims: list[BudgetClaim]) -> bool:
        """Whether ``claims`` would fit if the reservations in flight used nothing: there are
        some, and what is spent leaves room."""
        assert self.store is not None
        ledger = {e.scope: e for e in await self.store.budget_ledger(run_id)}
        in_flight = False
        for claim in claims:
            entry = ledger.get(claim.scope)
            if entry is None:
                continue
            in_flight |= entry.reserved_tokens > 0 or entry.reserved_usd > 0
            if claim.limit_tokens is not None and entry.spent_tokens + claim.tokens > claim.limit_tokens:
                return False
            if claim.limit_usd is not None and entry.spent_usd + claim.usd > claim.limit_usd + 1e-12:
                return False
        return in_flight

    async def _settle(
        self, guard: BudgetGuard | None, reservation: _Reservation, response: ChatResponse | None
    ) -> None:
        assert self.store is not None and guard is not None
        used, usd = 0, 0.0
        if response is not None and response.usage is not None:
            used = response.usage.input_tokens + response.usage.output_tokens
            usd = response.cost_usd or 0.0
        settles = [BudgetSettle(scope, rt, ru, used, usd) for scope, rt, ru in reservation.settles]
        await self.store.budget_settle(guard.run_id, settles)
        over = [s for s in settles if s.tokens > s.reserved_tokens or s.usd > s.reserved_usd + 1e-12]
        if over and self.on_overrun is not None:  # booked as used; later calls must fit what is left
            self.on_overrun(
                guard.run_id,
                {
                    "step_id": guard.step_id,
                    "scopes": [s.scope for s in over],
                    "reserved_tokens": over[0].reserved_tokens,
                    "used_tokens": used,
                    "reserved_usd": round(over[0].reserved_usd, 8),
                    "used_usd": round(usd, 8),
                },
            )

    async def _route(
        self, model: str | None, tier: str | None, complexity: str | None, guard: BudgetGuard | None
    ) -> tuple[list[str], bool]:
        """The models to try, in order; and whether the budget moved the call a tier down."""
        if model is not None:
            return self._chain(model), False
        tier = tier or self.config.tier_of(complexity)
        if tier is not None and tier in self.config.tiers:
            tightened = False
            if guard is not None and await self._budget_tight(guard):
                lower = self.config.lower_tier(tier)
                tier, tightened = lower, lower != tier
            order: list[str] = []
            for name in self.config.tiers[tier]:
                order += [m for m in self._chain(name) if m not in order]
            return order, tightened
        if self.config.default_model is None:
            raise ProviderError(self.config.problems(None)[0])
        return self._chain(self.config.default_model), False

    async def _budget_tight(self, guard: BudgetGuard) -> bool:
        assert self.store is not None
        ledger = {e.scope: e for e in await self.store.budget_ledger(guard.run_id)}
        for scope, budget in guard.scopes:
            entry = ledger.get(scope)
            if entry is None:
                continue
            share = self.config.downgrade_at
            if budget.usd is not None and entry.spent_usd >= share * budget.usd:
                return True
            if budget.tokens is not None and entry.spent_tokens >= share * budget.tokens:
                return True
        return False

    async def _call(self, order: list[str], request: ChatRequest) -> ChatResponse:
        """Try the models in order (skipping those cooling down); the first answer, or the last error.

        A model that fails transiently past its retries cools down for ``cooldown_s``. When
        every model is cooling down, the call waits (at most ``max_wait_s``) for the first
        to be ready again rather than fail.
        """
        now = time.monotonic()
        ready = [m for m in order if self._cooling.get(m, 0.0) <= now]
        if not ready:
            soonest = min(order, key=lambda m: self._cooling[m])
            await asyncio.sleep(min(self._cooling[soonest] - now, self.config.max_wait_s))
            ready = [soonest]
        first = order[0]
        last: ProviderError | None = None
        for name in ready:
            provider = self._provider(name)
            for tries in range(self.config.max_retries + 1):
                try:
                    response = await provider.complete(replace(request, model=name))
                except ProviderError as exc:
                    last = exc
                    if not exc.transient:
                        break
                    if tries < self.config.max_retries:
                        wait = exc.retry_after_s if exc.retry_after_s is not None else BACKOFF_S * 2**tries
                        await asyncio.sleep(min(wait, self.config.max_wait_s))
                    continue
                self._cooling.pop(name, None)
                response = self._account(name, response)
                return response if name == first else replace(response, source="fallback")
            if last is not None and last.transient:
                self._cooling[name] = time.monotonic() + self.config.cooldown_s
        assert last is not None
        raise last

    def _account(self, name: str, response: ChatResponse) -> ChatResponse:
        """The response with its cost (from its usage and the price of the model that answered)."""
        if response.usage is None:
            return response
        spec = self.config.models.get(name)
        hint = spec.provider if spec is not None and spec.provider != "scripted" else None
        cost = self.prices.cost_usd(response.model, response.usage, hint)
        saved = self.prices.cache_saving_usd(response.model, response.usage, hint)
        if saved is not None:  # the provider's prompt cache: what it saved, for the record
            return replace(response, cost_usd=cost, raw={**response.raw, "prompt_cache_saved_usd": saved})
        return replace(response, cost_usd=cost)

    async def _cached(self, key: str, kind: str) -> ChatResponse | None:
        assert self.store is not None
        text = await self.store.cache_get(key, time.time())
        if text is None:
            return None
        data = json.loads(text)
        if data.get("v") != CACHE_VERSION:
            return None  # written before answers were cached only once accepted: maybe rejected
        usage = data.get("usage")
        return ChatResponse(
            text=data["text"],
            model=data["model"],
            usage=Usage(**usage) if usage else None,
            provider=data.get("provider", ""),
            cost_usd=0.0,
            source="cached",
            raw={"saved_usd": data.get("cost_usd"), "cache": kind},
        )

    async def _remember(self, key: str, response: ChatResponse) -> None:
        assert self.store is not None
        value = {
            "v": CACHE_VERSION,
            "text": response.text,
            "model": response.model,
            "provider": response.provider,
            "usage": response.usage.to_dict() if response.usage else None,
            "cost_usd": response.cost_usd,
        }
        now = time.time()
        ttl = self.config.cache.ttl_s
        await self.store.cache_put(key, json.dumps(value), now, now + ttl if ttl is not None else None)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
