"""LLM gateway benchmark: what routing, rules and caches save on a replay workload.

Prints one JSON document.

    python bench/llm.py [--requests 600] [--seeds 1 2 3 4 5] [--data /work/shared/data/qqp_pairs_dev.jsonl]

Figures are medians over the seeds, each a different draw of the workload.

The workload replays real user questions (the Quora sample in shared/data) through the
gateway, offline: each model answers from a scripted cassette, tokens are counted by the
tokenizer and priced by the maintained price table. It is fixed before anything is
measured (the seed) and mixes:

- kinds of request: 55% a question asked for the first time, 15% an exact repeat of an
  earlier request, 20% a paraphrase (the other question of a pair labelled duplicate whose
  first question was asked before), 10% an order-status question a rule can answer;
- complexity, drawn once per question (baton's four levels): 70% simple (classify the
  question's topic), 20% medium (answer in two sentences), 8% complex (a detailed
  analysis with sources), 2% crisis (the analysis, with sources and the risks).

Each kind of task has a validator: a topic line; two sentences; a "Sources:" section; and
"Sources:" and "Risks:". The cheap model writes neither analysis (its answer fails), the
standard one the analysis but not the risks; the premium one does everything. The
premium model is therefore needed for the crisis requests: their share of the baseline's
spend (``premium_needed_share``) is a floor no router can go below.

Configurations, each on a fresh database:
- ``all_premium`` (the baseline): every request to the premium model, no rules, no cache;
- ``routed``: tiers by complexity (simple and medium -> cheap, complex -> standard,
  crisis -> premium), the order-status rule, the exact and the semantic cache;
- ``all_cheap``: every request to the cheap model with the same rules and caches, to show
  what routing keeps that cheapness alone does not.

Targets: ``routed`` spends at most 1/20 of ``all_premium`` with the same share of
validated results. Beside it, the semantic cache's precision and recall on the labelled
pairs (bench/semantic.py, run here as it is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from baton.llm import LLMConfig
from baton.llm.gateway import Gateway
from baton.llm.types import ChatRequest, Message
from baton.store.sqlite.store import SQLiteStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qqp_pairs_dev.jsonl"
MODELS = {"cheap": "gpt-4.1-nano", "standard": "gpt-4.1-mini", "premium": "claude-opus-4-1-20250805"}
KINDS = {"new": 0.55, "repeat": 0.15, "paraphrase": 0.20, "rule": 0.10}
COMPLEXITY = {"simple": 0.70, "medium": 0.20, "complex": 0.08, "crisis": 0.02}
ROUTING = {"simple": "cheap", "medium": "cheap", "complex": "standard", "crisis": "premium"}
FRAMES = {
    "simple": "Classify the topic of this question in one word: ",
    "medium": "Answer in two sentences: ",
    "complex": "Write a detailed analysis, with sources, of: ",
    "crisis": "Write a detailed analysis, with sources and the risks, of: ",
}
VALID = {
    "simple": re.compile(r"^Topic: \w+\.$"),
    "medium": re.compile(r"\.\s+\S.*\.\s*$", re.S),
    "complex": re.compile(r"\nSources: \S"),
    "crisis": re.compile(r"\nSources: \S.*\nRisks: \S", re.S),
    "rule": re.compile(r"shipped"),
}
RULE = {
    "name": "order-status",
    "prompt": r"status of order (?P<id>\d+)",
    "answer": r"Order \g<id> has shipped.",
}
TWO_SENTENCES = (
    "It depends on the circumstances and on what you want to achieve in the end. "
    "Start from the basics, compare the options that are open to you, and decide step by step."
)
ANALYSIS = " ".join(
    f"Point {i}: the question touches on background, incentives, trade-offs and evidence, "
    "each of which changes the answer in a different way."
    for i in range(1, 13)
)


def cassette(tier: str) -> dict[str, Any]:
    """What a model of ``tier`` answers: the premium one everything; the others not all."""
    sources = "\nSources: survey data 2024; two textbooks; expert interviews."
    risks = "\nRisks: the data is thin for small groups; incentives may shift."
    analysis = {"cheap": "It is complicated.", "standard": ANALYSIS + sources, "premium": ANALYSIS + sources}
    with_risks = {
        "cheap": "It is complicated.",
        "standard": ANALYSIS + sources,
        "premium": ANALYSIS + sources + risks,
    }
    return {
        "responses": [
            {"prompt": "^Classify the topic", "text": "Topic: general."},
            {"prompt": "^Answer in two sentences", "text": TWO_SENTENCES},
            {"prompt": "with sources and the risks", "text": with_risks[tier]},
            {"prompt": "^Write a detailed analysis", "text": analysis[tier]},
            {"prompt": "status of order", "text": "Your order has shipped."},
        ]
    }


@dataclass(frozen=True, slots=True)
class Request:
    kind: str
    complexity: str
    prompt: str
    #: the question this one was asked as (a paraphrase: its pair's first question)
    origin: str


def workload(rows: list[dict[str, Any]], n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    duplicates = [r for r in rows if r["duplicate"]]
    others = [r for r in rows if not r["duplicate"]]
    rng.shuffle(duplicates)
    rng.shuffle(others)
    fresh = [(r["a"], r["b"]) for r in duplicates] + [(r["a"], None) for r in others]
    rng.shuffle(fresh)
    complexity_of: dict[str, str] = {}
    asked: list[Request] = []
    waiting_paraphrase: list[tuple[str, str]] = []  # (asked question, its unasked duplicate)
    out: list[Request] = []
    kinds, weights = list(KINDS), list(KINDS.values())
    levels, level_weights = list(COMPLEXITY), list(COMPLEXITY.values())
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        if kind == "repeat" and asked:
            out.append(rng.choice(asked))
            continue
        if kind == "paraphrase" and waiting_paraphrase:
            first, second = waiting_paraphrase.pop(rng.randrange(len(waiting_paraphrase)))
            level = complexity_of[first]
            out.append(Request("paraphrase", level, FRAMES[level] + second, first))
            continue
        if kind == "rule":
            order = rng.randrange(10_000, 99_999)
            out.append(Request("rule", "simple", f"What is the status of order {order}?", ""))
            continue
        question, duplicate = fresh.pop()
        level = rng.choices(levels, level_weights)[0]
        complexity_of[question] = level
        request = Request("new", level, FRAMES[level] + question, question)
        asked.append(request)
        out.append(request)
        if duplicate is not None:
            waiting_paraphrase.append((question, duplicate))
    return out


def config(folder: Path, name: str) -> LLMConfig:
    for tier in MODELS:
        (folder / f"{tier}.yaml").write_text(yaml.safe_dump(cassette(tier)), encoding="utf-8")
    models = {
        tier: {"provider": "scripted", "model": model, "cassette": str(folder / f"{tier}.yaml")}
        for tier, model in MODELS.items()
    }
    data: dict[str, Any] = {"models": models, "default_model": "premium"}
    if name == "all_premium":
        data["cache"] = {"exact": False}
    else:
        data["rules"] = [RULE]
        data["cache"] = {"exact": True, "semantic": {}}
        if name == "routed":
            data["tiers"] = {tier: [tier] for tier in MODELS}
            data["routing"] = ROUTING
        else:
            data["default_model"] = "cheap"
    return LLMConfig.model_validate(data)


async def replay(requests: list[Request], folder: Path, name: str) -> dict[str, Any]:
    store = SQLiteStore(folder / f"{name}.db")
    await store.open()
    gateway = Gateway(config(folder, name), store)
    spend = 0.0
    valid = 0
    sources: Counter[str] = Counter()
    wrong_semantic = 0
    crisis_spend = 0.0
    by_prompt = {r.prompt: r for r in requests}
    started = time.perf_counter()
    try:
        for r in requests:
            request = ChatRequest(messages=(Message("user", r.prompt),), temperature=0.3, max_tokens=600)
            response = await gateway.complete(request, complexity=r.complexity)
            spend += response.cost_usd or 0.0
            cache = response.raw.get("cache")
            sources[f"cached_{cache}" if response.source == "cached" else response.source] += 1
            if cache == "semantic":
                matched = by_prompt.get(str(response.raw.get("matched_prompt")))
                if matched is None or (matched.origin != r.origin and matched.origin):
                    wrong_semantic += 1
            valid += VALID["rule" if r.kind == "rule" else r.complexity].search(response.text) is not None
            if r.complexity == "crisis" and r.kind != "rule":
                crisis_spend += response.cost_usd or 0.0
    finally:
        await gateway.aclose()
        await store.close()
    hits = sources["cached_exact"] + sources["cached_semantic"]
    return {
        "spend_usd": round(spend, 6),
        "validated_share": round(valid / len(requests), 4),
        "sources": dict(sorted(sources.items())),
        "cache_hit_rate": round(hits / len(requests), 4),
        "semantic_hits_on_another_question": wrong_semantic,
        "spend_on_crisis_usd": round(crisis_spend, 6),
        "seconds": round(time.perf_counter() - started, 2),
    }


def semantic_figures(data: Path) -> dict[str, Any]:
    """bench/semantic.py as it is: the semantic cache's decision on the labelled pairs."""
    script = Path(__file__).with_name("semantic.py")
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(data)], capture_output=True, text=True, check=True
    )
    figures: dict[str, Any] = json.loads(done.stdout)
    return {key: figures[key] for key in ("pairs", "target", "shipped", "cosine_only", "for_recall_0_5")}


def round_(rows: list[dict[str, Any]], n: int, seed: int) -> dict[str, Any]:
    requests = workload(rows, n, seed)
    out: dict[str, Any] = {
        "seed": seed,
        "mix": {
            "kinds": dict(sorted(Counter(r.kind for r in requests).items())),
            "complexity": dict(sorted(Counter(r.complexity for r in requests).items())),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("all_premium", "routed", "all_cheap"):
            out[name] = asyncio.run(replay(requests, Path(tmp), name))
    baseline = out["all_premium"]
    out["routed_spend_over_baseline"] = round(out["routed"]["spend_usd"] / baseline["spend_usd"], 4)
    out["premium_needed_share"] = round(baseline["spend_on_crisis_usd"] / baseline["spend_usd"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-pairs", action="store_true", help="skip the labelled-pairs figures")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rounds = [round_(rows, args.requests, seed) for seed in args.seeds]

    def median(path: tuple[str, ...]) -> float:
        values = []
        for r in rounds:
            value: Any = r
            for key in path:
                value = value[key]
            values.append(float(value))
        return round(statistics.median(values), 4)

    ratio = median(("routed_spend_over_baseline",))
    same_quality = all(r["routed"]["validated_share"] >= r["all_premium"]["validated_share"] for r in rounds)
    out: dict[str, Any] = {
        "requests": args.requests,
        "models": MODELS,
        "routing": ROUTING,
        "median": {
            "routed_spend_over_baseline": ratio,
            "premium_needed_share": median(("premium_needed_share",)),
            "cache_hit_rate": median(("routed", "cache_hit_rate")),
            "autonomous_share": round(
                statistics.median(
                    r["routed"]["sources"].get("autonomous", 0) / args.requests for r in rounds
                ),
                4,
            ),
            "validated_share_all_premium": median(("all_premium", "validated_share")),
            "validated_share_routed": median(("routed", "validated_share")),
            "validated_share_all_cheap": median(("all_cheap", "validated_share")),
        },
        "target": {
            "spend_ratio_at_most": 0.05,
            "met": ratio <= 0.05 and same_quality,
            "routed_validated_at_least_baseline_in_every_round": same_quality,
        },
        "rounds": rounds,
    }
    if not args.no_pairs:
        out["semantic_cache_on_labelled_pairs"] = semantic_figures(args.data)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
