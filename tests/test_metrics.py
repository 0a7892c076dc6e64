"""Metrics from the event stream (model calls by model and source, tokens, spend, cache,
queue waits) and from the store at a scrape (queue depth, waves of the runs under way)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from baton import Engine, RunStatus
from baton.llm import LLMConfig
from baton.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_model_calls_tokens_spend_and_cache_hits(tmp_path: Path) -> None:
    cassette = tmp_path / "c.yaml"
    cassette.write_text(
        yaml.safe_dump(
            {
                "responses": [
                    {"prompt": "capital", "text": "Paris.", "usage": {"input_tokens": 20, "output_tokens": 3}}
                ]
            }
        )
    )
    config = LLMConfig.model_validate(
        {
            "default_model": "mini",
            "models": {"mini": {"provider": "scripted", "model": "gpt-4o-mini", "cassette": str(cassette)}},
        }
    )
    step = {"task": "llm.generate", "with": {"prompt": "What is the capital of France?"}}
    async with Engine(str(tmp_path / "m.db"), llm=config) as engine:
        metrics = Metrics(engine)
        first = await engine.run({"name": "ask", "steps": [{"id": "ask", **step}]})
        again = await engine.run(
            {"name": "again", "steps": [{"id": "ask", **step}, {"id": "f", "task": "fail"}]}
        )
        metrics.close()
    assert first.status is RunStatus.COMPLETED and again.status is RunStatus.FAILED
    assert sample(metrics, "baton_llm_calls_total", model="gpt-4o-mini", source="llm") == 1
    assert sample(metrics, "baton_llm_calls_total", model="gpt-4o-mini", source="cached") == 1
    assert sample(metrics, "baton_llm_cache_hits_total", kind="exact") == 1
    # tokens and spend of the one call that reached the model, not of the cache hit
    assert sample(metrics, "baton_llm_tokens_total", model="gpt-4o-mini", direction="input") == 20
    assert sample(metrics, "baton_llm_tokens_total", model="gpt-4o-mini", direction="output") == 3
    assert 0 < sample(metrics, "baton_llm_cost_usd_total", model="gpt-4o-mini") < 0.001
    assert sample(metrics, "baton_step_attempts_total", task="fail", outcome="failed") == 1
    assert sample(metrics, "baton_runs_total", status="completed") == 1
    assert sample(metrics, "baton_runs_total", status="failed") == 1
    assert sample(metrics, "baton_run_duration_seconds_count") == 2
    # the first run paid for its call, the second had it from the cache
    assert sample(metrics, "baton_run_cost_usd_count") == 2
    assert sample(metrics, "baton_run_cost_usd_sum") == sample(
        metrics, "baton_llm_cost_usd_total", model="gpt-4o-mini"
    )
    assert sample(metrics, "baton_run_cost_usd_bucket", le="1e-06") == 1  # the cached one: 0
    assert sample(metrics, "baton_steps_running") == 0


async def test_queue_waits_and_the_waves_of_a_run_under_way(tmp_path: Path) -> None:
    plan = {
        "name": "waves",
        "policy": {"max_parallel": 1},
        "steps": [
            {"id": "a", "task": "sleep", "with": {"seconds": 0.3}},
            {"id": "b", "task": "sleep", "with": {"seconds": 0.3}},
            {"id": "c", "task": "echo", "needs": ["a", "b"]},
        ],
    }
    async with Engine(str(tmp_path / "w.db"), poll_s=0.05) as engine:
        metrics = Metrics(engine)
        handle = await engine.submit(plan)
        await asyncio.sleep(0.45)  # a has finished, b runs: wave 0 is half done
        await metrics.refresh(engine.store, time.time())
        run = handle.run_id
        assert sample(metrics, "baton_run_waves", run=run) == 2
        assert sample(metrics, "baton_run_waves_completed", run=run) == 0
        assert sample(metrics, "baton_run_current_wave_completion", run=run) == 0.5
        assert (await handle.wait()).status is RunStatus.COMPLETED
        await metrics.refresh(engine.store, time.time())
        metrics.close()
    assert sample(metrics, "baton_run_waves", run=run) == 0.0  # it ended: no longer listed
    # One slot: b waited for a (0.3 s) before it started; every start was observed.
    assert sample(metrics, "baton_queue_wait_seconds_count", task="sleep") == 2
    assert sample(metrics, "baton_queue_wait_seconds_count", task="echo") == 1
    assert 0.25 <= sample(metrics, "baton_queue_wait_seconds_sum", task="sleep") < 1.0
