"""Metrics from the event stream: model calls by model and source, tokens, spend, cache."""

from __future__ import annotations

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
    assert sample(metrics, "baton_steps_running") == 0
