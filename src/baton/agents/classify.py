"""What kind of task a description asks for: a task type, with a confidence and the method.

Rules first: patterns of the words engineers use for each kind of work (a test, a fix, a
refactoring, a consumer of a message stream...), each with a weight that says how sure a
match makes us; a type's score combines its matches (noisy-or), the first word counts
more (task descriptions and commit subjects lead with what is done), and the confidence is
the best score less half the runner-up's, so a description that reads as two kinds of work
is not called sure. When no rule is confident and the ``semantic`` extra is installed, the
description is compared with short descriptions of each type on the all-MiniLM-L6-v2
embeddings (the ones the semantic cache uses): the margin between the best two types is
the confidence. Below that, the task is ``general``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from baton.errors import UsageError
from baton.llm.config import semantic_extra_installed

if TYPE_CHECKING:
    from baton.llm.semantic import Vector

TASK_TYPES = (
    "testing",
    "bugfix",
    "nats_consumer",
    "api_endpoint",
    "database",
    "security",
    "microservice",
    "web_component",
    "refactoring",
    "documentation",
    "configuration",
    "devops",
    "performance",
    "data_processing",
)
GENERAL = "general"
LANGUAGES = ("elixir", "rust", "typescript", "go", "python", "javascript", "sql")
#: the most text classified: a task description, not a document
MAX_CHARS = 20_000
#: below this the rules' answer is not taken
RULES_CONFIDENT = 0.5
#: below this margin between the best two types, the embeddings' answer is not taken
PROTOTYPES_CONFIDENT = 0.04
PROTOTYPES_MOST = 0.8
#: a match on the first word (what is done) counts this much more
LEAD_BONUS = 0.1

_I = re.I


def _rules(*pairs: tuple[str, float]) -> list[tuple[re.Pattern[str], float]]:
    return [(re.compile(rf"\b(?:{pattern})\b", _I), weight) for pattern, weight in pairs]


RULES: dict[str, list[tuple[re.Pattern[str], float]]] = {
    "testing": _rules(
        (r"tests?|testing|tested|unit[- ]tests?|test cases?|specs?", 0.85),
        (r"coverage|e2e|end[- ]to[- ]end|fixtures?|mocks?|mocking|stubs?|snapshots?|assertions?", 0.75),
        (r"pytest|jest|vitest|mocha|exunit|cypress|playwright|jsdom|flaky", 0.75),
    ),
    "bugfix": _rules(
        (r"fix(?:es|ed|ing)?|bugs?|bugfix|hotfix", 0.7),
        (r"crash(?:es|ed|ing)?|regressions?|broken|incorrect(?:ly)?|wrong|panics?|exceptions?", 0.6),
        (r"should(?: not|n't)|does(?: not|n't) work|not working|fails? to|edge cases?", 0.55),
        (r"errors?|issues?|missing|properly|ensure|prevent|handle|compat(?:ibility)?|workaround", 0.35),
    ),
    "refactoring": _rules(
        (r"refactor(?:s|ed|ing)?|restructur(?:e|ed|ing)|reorgani[sz]e|rewrite", 0.85),
        (r"renam(?:e|ed|es|ing)|clean ?up|cleanup|simplif(?:y|ied|ies)|dedupe|de-?duplicate", 0.7),
        (r"extract(?:ed)?|split|consolidat(?:e|ed)|reuse|move(?:d)?|inline|unused|dead code", 0.5),
        (r"tree-?shak(?:e|able|ing)|internal|types?|naming|readability", 0.35),
    ),
    "documentation": _rules(
        (r"docs?|documentation|document(?:ed|ing)?|readme|changelog|typos?", 0.85),
        (r"comments?|jsdoc|tsdoc|docstrings?|guide|tutorial|examples?|wording|grammar|spelling", 0.6),
        (r"ci skip|skip ci", 0.6),
    ),
    "performance": _rules(
        (r"perf|performance|optimi[sz](?:e|es|ed|ation|ing)|faster|speed(?: ?up)?|fast ?path", 0.85),
        (r"efficien(?:t|cy|tly)|benchmarks?|latency|throughput|memory|allocations?|overhead", 0.7),
        (r"avoid(?:s|ing)?|cach(?:e|es|ed|ing)|lazy|lazily|hoist(?:ed|ing)?|bundle size|deopt", 0.45),
    ),
    "devops": _rules(
        (r"ci|cd|pipelines?|workflows?|github actions|deploy(?:s|ed|ment)?|releases?|release notes", 0.75),
        (r"docker(?:file)?|kubernetes|k8s|helm|terraform|ansible|containers?", 0.8),
        (r"build|builds|bump|dependenc(?:y|ies)|deps|upgrade|npm|pnpm|yarn|lockfile|package\.json", 0.6),
        (r"rollup|webpack|esbuild|vite|lint(?:ing|er)?|eslint|prettier|husky|renovate|scripts?", 0.5),
    ),
    "nats_consumer": _rules(
        (r"nats|jetstream", 0.9),
        (r"consumers?|subscri(?:be|ber|bers|ption)|pub/?sub|message (?:queue|stream|broker)", 0.6),
        (r"kafka|rabbitmq|amqp|events? stream", 0.45),
    ),
    "api_endpoint": _rules(
        (r"endpoints?|rest(?:ful)? api|api routes?|graphql|grpc method", 0.85),
        (r"routes?|controllers?|http handlers?|request handlers?|openapi|swagger|status codes?", 0.55),
        (r"api|get|post|put|patch|delete", 0.25),
    ),
    "database": _rules(
        (r"sql|postgres(?:ql)?|mysql|sqlite|database|migrations?|schema", 0.8),
        (r"tables?|index(?:es)?|queries|query|orm|transactions?|joins?|ecto|prisma|sqlalchemy", 0.5),
    ),
    "security": _rules(
        (r"security|vulnerab(?:le|ility|ilities)|cve|xss|csrf|injection|exploit|sanitiz(?:e|ation)", 0.9),
        (r"auth(?:entication|orization)?|permissions?|secrets?|encrypt(?:ion)?|tls|oauth|jwt|rbac", 0.6),
    ),
    "microservice": _rules(
        (r"microservices?|service mesh|service discovery|sidecar", 0.85),
        (r"services?|grpc|circuit breaker|health ?checks?", 0.35),
    ),
    "web_component": _rules(
        (r"components?|web components?|widgets?|dropdowns?|modals?|buttons?|tooltips?|navbar", 0.75),
        (r"ui|forms?|page|react|vue|svelte|angular|liveview|css|html|dom|render(?:s|ing|er)?|styles?", 0.4),
    ),
    "configuration": _rules(
        (r"config(?:uration|s)?|env(?:ironment)? var(?:iable)?s?|feature flags?", 0.8),
        (r"settings|yaml|toml|\.env|options?|defaults?", 0.4),
    ),
    "data_processing": _rules(
        (r"etl|data pipeline|csv|parquet|batch (?:job|processing)|stream processing|dataframes?", 0.85),
        (r"parse|parsing|transform(?:s|ing)?|aggregat(?:e|ion)|ingest(?:ion)?|normali[sz]e|dedup", 0.4),
    ),
}

#: what each type is about, in the words a task would use: compared with the description
#: on the embeddings when no rule is sure
PROTOTYPES: dict[str, tuple[str, ...]] = {
    "testing": (
        "add unit tests for this function",
        "write a test case that reproduces the issue",
        "improve test coverage of the module",
    ),
    "bugfix": (
        "fix a bug where the app crashes",
        "the value is wrong in this edge case and should not change",
        "handle the error instead of failing",
    ),
    "refactoring": (
        "refactor the code without changing its behaviour",
        "rename and simplify the internal helpers",
        "move shared logic into one place",
    ),
    "documentation": (
        "update the documentation and the readme",
        "fix a typo in the guide",
        "add comments explaining the function",
    ),
    "performance": (
        "make this faster and use less memory",
        "optimize the hot path to avoid unnecessary work",
        "reduce the overhead of each call",
    ),
    "devops": (
        "set up the continuous integration pipeline and the build",
        "deploy the service with docker",
        "bump the dependencies and the release scripts",
    ),
    "nats_consumer": (
        "create a NATS consumer that processes user events",
        "subscribe to a message stream and handle each message",
    ),
    "api_endpoint": (
        "add a REST API endpoint that returns the user",
        "handle an HTTP request and respond with JSON",
    ),
    "database": (
        "write a database migration that adds a table",
        "write an SQL query joining two tables",
    ),
    "security": (
        "fix a security vulnerability such as an injection",
        "add authentication and check permissions",
    ),
    "microservice": (
        "build a microservice that talks to other services",
        "split the monolith into small services",
    ),
    "web_component": (
        "build a UI component with a button and a form",
        "render the page and style it with CSS",
    ),
    "configuration": (
        "add a configuration option with a default value",
        "read the settings from environment variables",
    ),
    "data_processing": (
        "process a CSV file and aggregate the rows",
        "transform and clean the records in a data pipeline",
    ),
}


@dataclass(frozen=True, slots=True)
class Classification:
    """A task type, how sure, and how it was decided (``rules``, ``prototypes`` or
    ``fallback``); ``scores`` are the candidate types' scores, best first."""

    type: str
    confidence: float
    method: str
    scores: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.type,
            "confidence": self.confidence,
            "method": self.method,
            "scores": {name: score for name, score in self.scores if score > 0},
        }


def check_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UsageError("the task description is empty")
    if len(text) > MAX_CHARS:
        raise UsageError(f"the task description is {len(text):,} characters; at most {MAX_CHARS:,}")
    return text.strip()


def check_language(language: object) -> str | None:
    if language is None:
        return None
    if not isinstance(language, str) or language.strip().lower() not in LANGUAGES:
        raise UsageError(f"unknown language {language!r} (known: {', '.join(LANGUAGES)})")
    return language.strip().lower()


def rule_scores(text: str, among: Iterable[str] = TASK_TYPES) -> list[tuple[str, float]]:
    """Each type's score from its rules (noisy-or of its matches), best first."""
    scores = []
    for name in among:
        missing = 1.0
        for pattern, weight in RULES[name]:
            found = pattern.search(text)
            if found is not None:
                if found.start() == 0:
                    weight = min(0.97, weight + LEAD_BONUS)
                missing *= 1.0 - weight
        scores.append((name, round(1.0 - missing, 4)))
    return sorted(scores, key=lambda s: -s[1])


def _margin(scores: Sequence[tuple[str, float]], share: float) -> float:
    best = scores[0][1] if scores else 0.0
    second = scores[1][1] if len(scores) > 1 else 0.0
    return max(0.0, best - share * second)


def classify(
    text: str, language: str | None = None, *, among: Sequence[str] | None = None, semantic: bool = True
) -> Classification:
    """The task type of ``text``: ``among`` limits the types considered (all by default);
    ``semantic`` allows the embeddings when no rule is sure (and the extra is installed)."""
    text = check_text(text)
    check_language(language)
    types = tuple(among) if among is not None else TASK_TYPES
    unknown = [t for t in types if t not in RULES]
    if unknown or not types:
        raise UsageError(f"unknown task type(s) {unknown} (known: {', '.join(TASK_TYPES)})")
    scores = rule_scores(text, types)
    confidence = round(_margin(scores, 0.5), 4)
    if confidence >= RULES_CONFIDENT:
        return Classification(scores[0][0], confidence, "rules", tuple(scores))
    if semantic and semantic_extra_installed():
        near = prototype_scores(text, types)
        margin = round(_margin(near, 1.0), 4)
        if margin >= PROTOTYPES_CONFIDENT:
            return Classification(near[0][0], _prototype_confidence(margin), "prototypes", tuple(near))
    return Classification(GENERAL, confidence, "fallback", tuple(scores))


def _prototype_confidence(margin: float) -> float:
    """The margin as a confidence: at the threshold, as sure as a rule just taken (0.5);
    never surer than PROTOTYPES_MOST, since a few example sentences are weaker evidence
    than the words of a rule."""
    return round(min(PROTOTYPES_MOST, RULES_CONFIDENT + 2.5 * (margin - PROTOTYPES_CONFIDENT)), 4)


def prototype_scores(text: str, among: Sequence[str] = TASK_TYPES) -> list[tuple[str, float]]:
    """Each type's similarity to ``text``: the mean of its two nearest prototypes, best first."""
    from baton.llm.semantic import load_embedder

    names, vectors = _prototypes()
    (probe,) = load_embedder().embed([text])
    scores = []
    for name in among:
        sims = sorted((float(v @ probe.vector) for n, v in zip(names, vectors, strict=True) if n == name))
        top = sims[-2:]
        scores.append((name, round(math.fsum(top) / len(top), 4)))
    return sorted(scores, key=lambda s: -s[1])


@cache
def _prototypes() -> tuple[tuple[str, ...], tuple[Vector, ...]]:
    from baton.llm.semantic import load_embedder

    pairs = [(name, text) for name, texts in PROTOTYPES.items() for text in texts]
    embedded = load_embedder().embed([text for _, text in pairs])
    return tuple(name for name, _ in pairs), tuple(e.vector for e in embedded)


__all__ = [
    "GENERAL",
    "LANGUAGES",
    "TASK_TYPES",
    "Classification",
    "check_language",
    "check_text",
    "classify",
    "prototype_scores",
    "rule_scores",
]
