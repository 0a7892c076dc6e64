"""LLM gateway benchmark: what routing saves beside the same caches and rules, on a replay.

Prints one JSON document.

    python bench/llm.py [--requests 600] [--seeds 1 2 3 4 5] [--data /work/shared/data/qqp_pairs_dev.jsonl]

Figures are medians over the seeds, each a different draw of the workload.

The workload replays real user questions (the Quora sample in shared/data) and the
near-miss set (tests/llm/data/near_misses.jsonl) through the gateway, offline: each model
answers from a scripted cassette, tokens are counted by the tokenizer and priced by the
maintained price table. It is fixed before anything is measured (the seed) and mixes:

- kinds of request: 50% a question asked for the first time, 15% an exact repeat of an
  earlier request, 20% a paraphrase (the other question of a pair labelled duplicate, or a
  near-miss paraphrase, whose first question was asked before), 5% a near miss (the other
  question of a near-miss negative whose first was asked: it must never be answered from
  the cache), 10% an order-status question a rule can answer;
- complexity, drawn once per question (baton's four levels): 70% simple (a topic label),
  20% medium (a few sentences), 8% complex (an analysis with sources), 2% crisis (with
  sources and the risks), each asked in one of three phrasings drawn per question (a
  paraphrase or near miss keeps its first question's).

Each kind of task has a validator: a topic line; two sentences; a "Sources:" section; and
"Sources:" and "Risks:". The cheap model writes neither analysis (its answer fails), the
standard one the analysis but not the risks; the premium one does everything. As a step
would, the replay caches an answer only once it passed its validator.

Arms, each on a fresh database, every one with the same order-status rule and the same
exact and semantic caches:
- ``all_premium`` (the baseline): every request to the premium model;
- ``routed``: tiers by complexity (simple and medium -> cheap, complex -> standard,
  crisis -> premium), the complexity estimated by the gateway from the request
  (baton.llm.complexity): what a user gets;
- ``oracle``: the same routing handed each request's true label: the floor routing
  could reach with a perfect estimate;
- ``all_cheap``: every request to the cheap model, to show what routing keeps that
  cheapness alone does not.

Reported: routed spend over the baseline and over the oracle floor, validated share by
arm, false hits on near misses and semantic hits taken from another question by arm, and
how the estimate agrees with the labels, here and on held-out requests (the second half of
tests/llm/data/complexity_heldout.jsonl, written by someone who had not seen the
estimator, which was adjusted on the first half only). Beside it, the semantic cache's precision and
recall on the labelled pairs (bench/semantic.py, run here as it is).
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
from baton.llm.complexity import LEVELS
from baton.llm.complexity import estimate as estimate_complexity
from baton.llm.gateway import CacheWrite, Gateway
from baton.llm.types import ChatRequest, Message
from baton.store.sqlite.store import SQLiteStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qqp_pairs_dev.jsonl"
TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "llm" / "data"
NEAR_MISSES = TEST_DATA / "near_misses.jsonl"
HELD_OUT = TEST_DATA / "complexity_heldout.jsonl"
MODELS = {"cheap": "gpt-4.1-nano", "standard": "gpt-4.1-mini", "premium": "claude-opus-4-1-20250805"}
KINDS = {"new": 0.50, "repeat": 0.15, "paraphrase": 0.20, "near_miss": 0.05, "rule": 0.10}
COMPLEXITY = {"simple": 0.70, "medium": 0.20, "complex": 0.08, "crisis": 0.02}
ROUTING = {"simple": "cheap", "medium": "cheap", "complex": "standard", "crisis": "premium"}
ARMS = ("all_premium", "routed", "oracle", "all_cheap")
#: three phrasings of each kind of task, written before the estimator was
FRAMES = {
    "simple": (
        "Classify the topic of this question in one word: ",
        "Which category does this question belong to? Reply with a single word. ",
        "Tag this question with one topic label: ",
    ),
    "medium": (
        "Answer in two sentences: ",
        "Briefly explain, in a short paragraph: ",
        "Give a short answer (a few sentences) to: ",
    ),
    "complex": (
        "Write a detailed analysis, with sources, of: ",
        "Research this question in depth and cite your sources: ",
        "Prepare a thorough report, with references, on: ",
    ),
    "crisis": (
        "Write a detailed analysis, with sources and the risks, of: ",
        "This is for a decision with legal exposure: analyse in depth, cite sources and list the risks of: ",
        "Our leadership must decide today. Give a comprehensive assessment with sources and the risks of: ",
    ),
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
    weak = "It is complicated."
    texts = {
        "simple": "Topic: general.",
        "medium": TWO_SENTENCES,
        "complex": weak if tier == "cheap" else ANALYSIS + sources,
        "crisis": {"cheap": weak, "standard": ANALYSIS + sources, "premium": ANALYSIS + sources + risks}[
            tier
        ],
    }
    responses = [
        {"prompt": "^" + re.escape(frame), "text": texts[level]}
        for level, frames in FRAMES.items()
        for frame in frames
    ]
    return {"responses": [*responses, {"prompt": "status of order", "text": "Your order has shipped."}]}


@dataclass(frozen=True, slots=True)
class Request:
    kind: str
    complexity: str
    prompt: str
    #: the question this one asks the same as (a paraphrase: its pair's first question)
    origin: str


def pairs(rows: list[dict[str, Any]], near: list[dict[str, Any]]) -> list[tuple[str, str | None, bool]]:
    """(first question, its partner or None, whether the partner asks the same)."""
    out: list[tuple[str, str | None, bool]] = []
    for r in rows:  # a Quora non-duplicate's partner is a question of its own, asked as new
        out.append((r["a"], r["b"], True) if r["duplicate"] else (r["a"], None, True))
    out += [(r["a"], r["b"], bool(r["same"])) for r in near]
    return out


def workload(rows: list[dict[str, Any]], near: list[dict[str, Any]], n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    fresh = pairs(rows, near)
    rng.shuffle(fresh)
    asked_as: dict[str, tuple[str, str]] = {}  # question -> (complexity, frame)
    asked: list[Request] = []
    waiting: dict[bool, list[tuple[str, str]]] = {True: [], False: []}  # (asked, its partner)
    out: list[Request] = []
    kinds, weights = list(KINDS), list(KINDS.values())
    levels, level_weights = list(COMPLEXITY), list(COMPLEXITY.values())
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        if kind == "repeat" and asked:
            out.append(rng.choice(asked))
            continue
        if kind in ("paraphrase", "near_miss") and waiting[kind == "paraphrase"]:
            queue = waiting[kind == "paraphrase"]
            first, second = queue.pop(rng.randrange(len(queue)))
            level, frame = asked_as[first]
            out.append(Request(kind, level, frame + second, first if kind == "paraphrase" else second))
            continue
        if kind == "rule":
            order = rng.randrange(10_000, 99_999)
            out.append(Request("rule", "simple", f"What is the status of order {order}?", ""))
            continue
        question, partner, same = fresh.pop()
        level = rng.choices(levels, level_weights)[0]
        frame = rng.choice(FRAMES[level])
        asked_as[question] = (level, frame)
        request = Request("new", level, frame + question, question)
        asked.append(request)
        out.append(request)
        if partner is not None:
            waiting[same].append((question, partner))
    return out


def config(folder: Path, name: str) -> LLMConfig:
    for tier in MODELS:
        (folder / f"{tier}.yaml").write_text(yaml.safe_dump(cassette(tier)), encoding="utf-8")
    models = {
        tier: {"provider": "scripted", "model": model, "cassette": str(folder / f"{tier}.yaml")}
        for tier, model in MODELS.items()
    }
    data: dict[str, Any] = {
        "models": models,
        "default_model": {"all_premium": "premium", "all_cheap": "cheap"}.get(name, "premium"),
        "rules": [RULE],
        "cache": {"exact": True, "semantic": {}},
    }
    if name in ("routed", "oracle"):
        data["tiers"] = {tier: [tier] for tier in MODELS}
        data["routing"] = ROUTING
    return LLMConfig.model_validate(data)


async def replay(requests: list[Request], folder: Path, name: str) -> dict[str, Any]:
    store = SQLiteStore(folder / f"{name}.db")
    await store.open()
    gateway = Gateway(config(folder, name), store)
    spend = 0.0
    valid = 0
    sources: Counter[str] = Counter()
    wrong_semantic = 0
    near_miss_hits = 0
    crisis_spend = 0.0
    by_prompt = {r.prompt: r for r in requests}
    started = time.perf_counter()
    try:
        for r in requests:
            request = ChatRequest(messages=(Message("user", r.prompt),), temperature=0.3, max_tokens=600)
            writes: list[CacheWrite] = []  # cached once it passed the validator, as a step's
            complexity = r.complexity if name == "oracle" else None
            response = await gateway.complete(request, complexity=complexity, deferred=writes)
            spend += response.cost_usd or 0.0
            cache = response.raw.get("cache")
            sources[f"cached_{cache}" if response.source == "cached" else response.source] += 1
            if cache == "semantic":
                matched = by_prompt.get(str(response.raw.get("matched_prompt")))
                if matched is None or (matched.origin != r.origin and matched.origin):
                    wrong_semantic += 1
                    near_miss_hits += r.kind == "near_miss"
            ok = VALID["rule" if r.kind == "rule" else r.complexity].search(response.text) is not None
            valid += ok
            if ok:
                await gateway.remember(writes)
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
        "false_hits_on_near_misses": near_miss_hits,
        "spend_on_crisis_usd": round(crisis_spend, 6),
        "seconds": round(time.perf_counter() - started, 2),
    }


def held_out() -> dict[str, Any]:
    """The estimate on the second half of tests/llm/data/complexity_heldout.jsonl: requests
    labelled by someone who had not seen the estimator (it was adjusted on the first half)."""
    lines = HELD_OUT.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][60:]
    requests = [Request("new", r["level"], r["prompt"], r["prompt"]) for r in rows]
    return agreement(requests)


def agreement(requests: list[Request]) -> dict[str, Any]:
    """How the gateway's estimate compares with the labels, on the requests routing sees."""
    routed = [r for r in requests if r.kind != "rule"]
    confusion: Counter[str] = Counter()
    for r in routed:
        guess = estimate_complexity(ChatRequest((Message("user", r.prompt),), max_tokens=600)).level
        confusion[f"{r.complexity}->{guess}"] += 1
    same = sum(n for key, n in confusion.items() if key.split("->")[0] == key.split("->")[1])
    under = sum(
        n
        for key, n in confusion.items()
        if LEVELS.index(key.split("->")[1]) < LEVELS.index(key.split("->")[0])
    )
    return {
        "share_agreeing": round(same / len(routed), 4),
        "share_under": round(under / len(routed), 4),
        "confusion": dict(sorted(confusion.items())),
    }


def semantic_figures(data: Path) -> dict[str, Any]:
    """bench/semantic.py as it is: the semantic cache's decision on the labelled pairs."""
    script = Path(__file__).with_name("semantic.py")
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(data)], capture_output=True, text=True, check=True
    )
    figures: dict[str, Any] = json.loads(done.stdout)
    return {key: figures[key] for key in ("pairs", "target", "shipped", "cosine_only", "for_recall_0_5")}


def round_(rows: list[dict[str, Any]], near: list[dict[str, Any]], n: int, seed: int) -> dict[str, Any]:
    requests = workload(rows, near, n, seed)
    out: dict[str, Any] = {
        "seed": seed,
        "mix": {
            "kinds": dict(sorted(Counter(r.kind for r in requests).items())),
            "complexity": dict(sorted(Counter(r.complexity for r in requests).items())),
        },
        "estimate": agreement(requests),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARMS:
            out[name] = asyncio.run(replay(requests, Path(tmp), name))
    baseline, floor = out["all_premium"]["spend_usd"], out["oracle"]["spend_usd"]
    out["routed_spend_over_baseline"] = round(out["routed"]["spend_usd"] / baseline, 4)
    out["routed_spend_over_oracle"] = round(out["routed"]["spend_usd"] / floor, 4)
    out["oracle_spend_over_baseline"] = round(floor / baseline, 4)
    out["premium_needed_share"] = round(out["all_premium"]["spend_on_crisis_usd"] / baseline, 4)
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
    near = [json.loads(line) for line in NEAR_MISSES.read_text(encoding="utf-8").splitlines() if line.strip()]
    rounds = [round_(rows, near, args.requests, seed) for seed in args.seeds]

    def median(*path: str) -> float:
        values = []
        for r in rounds:
            value: Any = r
            for key in path:
                value = value[key]
            values.append(float(value))
        return round(statistics.median(values), 4)

    out: dict[str, Any] = {
        "requests": args.requests,
        "models": MODELS,
        "routing": ROUTING,
        "median": {
            "routed_spend_over_baseline": median("routed_spend_over_baseline"),
            "oracle_spend_over_baseline": median("oracle_spend_over_baseline"),
            "routed_spend_over_oracle": median("routed_spend_over_oracle"),
            "premium_needed_share": median("premium_needed_share"),
            "estimate_agreeing": median("estimate", "share_agreeing"),
            "estimate_under": median("estimate", "share_under"),
            "cache_hit_rate_routed": median("routed", "cache_hit_rate"),
            "autonomous_share": round(
                statistics.median(
                    r["routed"]["sources"].get("autonomous", 0) / args.requests for r in rounds
                ),
                4,
            ),
            "validated_share": {arm: median(arm, "validated_share") for arm in ARMS},
        },
        "false_hits_on_near_misses": {
            arm: sum(r[arm]["false_hits_on_near_misses"] for r in rounds) for arm in ARMS
        },
        "near_misses_asked": sum(r["mix"]["kinds"].get("near_miss", 0) for r in rounds),
        "semantic_hits_on_another_question": {
            arm: sum(r[arm]["semantic_hits_on_another_question"] for r in rounds) for arm in ARMS
        },
        "estimate_on_held_out_requests": held_out(),
        "rounds": rounds,
    }
    if not args.no_pairs:
        out["semantic_cache_on_labelled_pairs"] = semantic_figures(args.data)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
