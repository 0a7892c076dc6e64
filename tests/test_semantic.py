"""The semantic cache, with the real model: what it reuses, what it refuses, and where it is on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton import Engine, RunStatus
from baton.errors import PlanError
from baton.llm import ChatRequest, Gateway, LLMConfig, Message
from baton.llm.config import SemanticCacheConfig
from baton.llm.semantic import Embedded, Embedder, guard, load_embedder
from baton.store import MemoryStore, Store
from tests.conftest import StoreFactory

THRESHOLD = SemanticCacheConfig().threshold


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


def pair(embedder: Embedder, earlier: str, new: str) -> tuple[Embedded, Embedded]:
    first, second = embedder.embed([earlier, new])
    return first, second


def reused(embedder: Embedder, earlier: str, new: str) -> bool:
    """Whether the cache would answer ``new`` with the answer to ``earlier``."""
    a, b = pair(embedder, earlier, new)
    return b.similarity(a) >= THRESHOLD and guard(b, a) is None


@pytest.mark.parametrize(
    ("earlier", "new", "because"),
    [
        ("turn on dark mode", "turn off dark mode", "opposite words: off / on"),
        ("refund order 1234", "refund order 1243", "the numbers differ"),
        ("how do I learn Python", "how do I learn Java", "a name is only in one: Java"),
        ("how do i learn python", "how do i learn java", "no counterpart for: java"),
        ("how do I learn Java", "how do I learn JavaScript", "a name is only in one: JavaScript"),
        ("delete the temporary files", "don't delete the temporary files", "one is negated, the other not"),
        ("fix the bug in parse_config", "fix the bug in load_config", "the identifiers differ"),
    ],
)
def test_the_guard_refuses_requests_that_differ_in_what_matters(
    embedder: Embedder, earlier: str, new: str, because: str
) -> None:
    a, b = pair(embedder, earlier, new)
    assert guard(b, a) == because
    assert not reused(embedder, earlier, new)


def test_plain_similarity_would_have_confused_them(embedder: Embedder) -> None:
    """What the guard is for: cosine alone scores these as the same request."""
    a, b = pair(embedder, "turn on dark mode", "turn off dark mode")
    assert b.similarity(a) >= THRESHOLD


@pytest.mark.parametrize(
    ("earlier", "new"),
    [
        ("What is the capital of France?", "What's the capital city of France?"),
        ("How do I reset my password?", "How can I reset my password?"),
    ],
)
def test_a_paraphrase_is_reused(embedder: Embedder, earlier: str, new: str) -> None:
    assert reused(embedder, earlier, new)


def test_the_model_loads_once_per_process() -> None:
    assert load_embedder() is load_embedder()


# -- through the gateway ----------------------------------------------------------------------


def semantic_config(tmp_path: Path, responses: list[dict[str, Any]], **cache: Any) -> LLMConfig:
    (tmp_path / "cassette.yaml").write_text(yaml.safe_dump({"responses": responses}))
    config = LLMConfig.model_validate(
        {
            "default_model": "replay",
            "models": {"replay": {"provider": "scripted", "cassette": "cassette.yaml"}},
            "cache": {"semantic": {}, **cache},
        }
    )
    config.base_dir = tmp_path
    return config


def ask(text: str) -> ChatRequest:
    return ChatRequest(
        messages=(Message("system", "Answer briefly."), Message("user", text)), temperature=0.0
    )


ANSWERS = [
    {
        "prompt": "^What is the capital of France",
        "text": "Paris.",
        "usage": {"input_tokens": 9, "output_tokens": 2},
    },
    {"prompt": "dark mode", "text": "Done."},
    {"prompt": ".", "text": "the provider was asked"},
]


async def test_a_paraphrase_is_answered_from_the_cache_without_calling_the_model(tmp_path: Path) -> None:
    gateway = Gateway(semantic_config(tmp_path, ANSWERS), MemoryStore())
    try:
        first = await gateway.complete(ask("What is the capital of France?"))
        second = await gateway.complete(ask("What's the capital city of France?"))
    finally:
        await gateway.aclose()
    assert (first.text, first.source) == ("Paris.", "llm")
    # Had the provider been asked, the cassette would have said so.
    assert (second.text, second.source, second.cost_usd) == ("Paris.", "cached", 0.0)
    assert second.raw["cache"] == "semantic"
    assert second.raw["matched_prompt"] == "What is the capital of France?"
    assert second.raw["similarity"] >= THRESHOLD


async def test_a_negated_request_goes_to_the_model(tmp_path: Path) -> None:
    gateway = Gateway(semantic_config(tmp_path, ANSWERS), MemoryStore())
    try:
        await gateway.complete(ask("Please turn on dark mode"))
        negated = await gateway.complete(ask("Please don't turn on dark mode"))
        again = await gateway.complete(ask("Please turn on dark mode"))
    finally:
        await gateway.aclose()
    assert (negated.text, negated.source) == ("Done.", "llm")
    assert again.source == "cached" and again.raw["cache"] == "exact"


async def test_only_the_same_conversation_and_parameters_share_answers(tmp_path: Path) -> None:
    gateway = Gateway(semantic_config(tmp_path, ANSWERS), MemoryStore())
    question = "What is the capital of France?"
    try:
        await gateway.complete(ask(question))
        other_system = ChatRequest(
            messages=(Message("system", "Answer in French."), Message("user", question))
        )
        hotter = ChatRequest(messages=ask(question).messages, temperature=0.9)
        answers = [await gateway.complete(r) for r in (other_system, hotter)]
    finally:
        await gateway.aclose()
    assert [a.source for a in answers] == ["llm", "llm"]


async def test_a_prompt_too_long_for_the_model_is_never_matched(tmp_path: Path) -> None:
    gateway = Gateway(semantic_config(tmp_path, [{"prompt": ".", "text": "fresh"}]), MemoryStore())
    document = " ".join(f"Paragraph {i} says nothing in particular." for i in range(80))
    try:
        await gateway.complete(ask(f"{document} Now list the risks of this plan."))
        changed_at_the_end = await gateway.complete(ask(f"{document} Now list the benefits of this plan."))
    finally:
        await gateway.aclose()
    # The model reads 256 tokens; what differs lies beyond them, so it must not decide.
    assert changed_at_the_end.source == "llm"


async def test_workers_on_one_database_share_the_semantic_cache(tmp_path: Path, stores: StoreFactory) -> None:
    config = semantic_config(tmp_path, ANSWERS)
    answers = []
    for question in ("What is the capital of France?", "What's the capital city of France?"):
        store: Store = stores()
        await store.open()
        gateway = Gateway(config, store)  # another worker, another process's view of the store
        try:
            answers.append(await gateway.complete(ask(question)))
        finally:
            await gateway.aclose()
            await store.close()
    assert [(a.text, a.source) for a in answers] == [("Paris.", "llm"), ("Paris.", "cached")]


async def test_a_step_says_its_answer_came_from_the_semantic_cache(tmp_path: Path) -> None:
    config = semantic_config(
        tmp_path, [{"step": "ask", "text": "Paris."}, {"step": "again", "text": "the provider was asked"}]
    )
    steps = [
        {"id": "ask", "task": "llm.generate", "with": {"prompt": "What is the capital of France?"}},
        {
            "id": "again",
            "task": "llm.generate",
            "needs": ["ask"],  # after it; without its output as context (that would change the question)
            "with": {"prompt": "What's the capital city of France?", "context": False},
        },
    ]
    async with Engine(str(tmp_path / "run.db"), llm=config) as engine:
        record = await engine.run({"name": "twice", "steps": steps})
        attempts = {a.step_id: a for a in await engine.store.get_attempts(record.id)}
        outputs = {s.step_id: s.output for s in await engine.store.get_steps(record.id)}
    assert record.status is RunStatus.COMPLETED
    assert outputs["again"]["text"] == "Paris."
    assert outputs["again"]["source"] == "cached"
    detail = attempts["again"].detail
    assert detail is not None
    assert detail["cache"] == "semantic"
    assert detail["matched_prompt"] == "What is the capital of France?"


async def test_without_the_extra_a_run_that_enables_it_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("baton.llm.config.semantic_extra_installed", lambda: False)
    config = semantic_config(tmp_path, ANSWERS)
    assert "cache.semantic: the semantic cache needs the semantic extra: pip install 'baton[semantic]'" in (
        config.problems(None)
    )
    step = {"id": "ask", "task": "llm.generate", "with": {"prompt": "Hello?"}}
    async with Engine(str(tmp_path / "run.db"), llm=config) as engine:
        with pytest.raises(PlanError, match=r"pip install 'baton\[semantic\]'"):
            await engine.submit({"name": "r", "steps": [step]})


def test_a_run_without_the_semantic_cache_never_loads_the_model(tmp_path: Path) -> None:
    """The model costs seconds and hundreds of MB: only a config that enables it loads it."""
    (tmp_path / "cassette.yaml").write_text(yaml.safe_dump({"responses": [{"prompt": ".", "text": "ok"}]}))
    (tmp_path / "llm.yaml").write_text(
        "default_model: r\nmodels: {r: {provider: scripted, cassette: cassette.yaml}}\n"
    )
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from baton.llm import ChatRequest, Gateway, LLMConfig, Message
        from baton.store import MemoryStore

        async def main():
            gateway = Gateway(LLMConfig.load({str(tmp_path / "llm.yaml")!r}), MemoryStore())
            for text in ("hello", "hello", "hello there"):
                await gateway.complete(ChatRequest(messages=(Message("user", text),)))
            await gateway.aclose()

        asyncio.run(main())
        print(sorted(m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


NEAR_MISSES = Path(__file__).with_name("llm") / "data" / "near_misses.jsonl"


def test_no_near_miss_is_ever_a_hit_either_way(embedder: Embedder) -> None:
    """The near-miss set (tests/llm/data/near_misses.jsonl): requests that differ by a
    negating prefix, an opposite, the order of what they name, a unit, a qualifier only
    one of them has, a number or an identifier. None may take the other's answer, whichever
    was asked first; the paraphrases beside them should (their share is reported)."""
    import json

    rows = [json.loads(line) for line in NEAR_MISSES.read_text().splitlines() if line.strip()]
    assert sum(not r["same"] for r in rows) >= 100
    embedded = embedder.embed([t for r in rows for t in (r["a"], r["b"])])
    false_hits, reused_paraphrases, paraphrases = [], 0, 0
    for i, row in enumerate(rows):
        a, b = embedded[2 * i], embedded[2 * i + 1]
        for new, earlier in ((b, a), (a, b)):
            hit = new.similarity(earlier) >= THRESHOLD and guard(new, earlier) is None
            if row["same"]:
                paraphrases += 1
                reused_paraphrases += hit
            elif hit:
                false_hits.append((row["class"], earlier.text, new.text))
    assert false_hits == []
    print(f"paraphrases reused: {reused_paraphrases} of {paraphrases}")
    assert reused_paraphrases >= paraphrases // 2  # the cache still earns its keep


@pytest.mark.parametrize(
    ("earlier", "new", "because"),
    [
        (
            "Is it safe to run this migration?",
            "Is it unsafe to run this migration?",
            "one negates a word of the other: safe / unsafe",
        ),
        (
            "Sort the list in ascending order.",
            "Sort the list in descending order.",
            "opposite words: descending / ascending",
        ),
        ("Convert 100 EUR to USD.", "Convert 100 USD to EUR.", "the same things in another order"),
        (
            "Why did the cat chase the dog?",
            "Why did the dog chase the cat?",
            "the same things in another order",
        ),
        ("Set the timeout to 30 seconds.", "Set the timeout to 30 minutes.", "the units differ"),
        (
            "Find the cheapest flight to Rome on a weekday.",
            "Find the cheapest flight to Rome.",
            "no counterpart for: weekday",
        ),
    ],
)
def test_the_guard_names_each_new_class(embedder: Embedder, earlier: str, new: str, because: str) -> None:
    a, b = pair(embedder, earlier, new)
    assert guard(b, a) == because
    assert guard(a, b) is not None  # and the other way round
