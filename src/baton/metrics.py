"""Prometheus metrics, kept current from the engine's event stream.

``Metrics(engine)`` subscribes to the engine's events (the one stream every interface
reads) and counts what this process's workers did; ``render()`` is what ``GET /metrics``
serves. Each Metrics has a registry of its own, so two engines in one process do not mix.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from baton.engine import Engine, Event
from baton.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: attempt outcomes, as the step events name them
OUTCOMES = ("succeeded", "failed", "retrying", "cancelled", "lost")
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)
RUN_BUCKETS = (0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0)
COST_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attempts = Counter(
            "baton_step_attempts",
            "Finished step attempts by task and outcome.",
            ["task", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "baton_step_retries", "Attempts that failed and will be retried.", ["task"], registry=r
        )
        self.started = Counter("baton_step_starts", "Attempts started, by task.", ["task"], registry=r)
        self.waited = Histogram(
            "baton_queue_wait_seconds",
            "From a step or job being ready (made, due, unblocked, its backoff over) to its start.",
            ["task"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "baton_step_duration_seconds",
            "Duration of finished attempts.",
            ["task"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.runs = Counter("baton_runs", "Runs that ended, by status.", ["status"], registry=r)
        self.run_seconds = Histogram(
            "baton_run_duration_seconds",
            "From a run's start to its end (runs started in this process).",
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.run_cost = Histogram(
            "baton_run_cost_usd",
            "What a run's model calls cost, USD (runs started in this process, at their end).",
            buckets=COST_BUCKETS,
            registry=r,
        )
        self.running = Gauge("baton_steps_running", "Attempts running in this process.", registry=r)
        self.llm_calls = Counter(
            "baton_llm_calls",
            "Model steps by model and what answered (llm, cached...).",
            ["model", "source"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "baton_llm_tokens",
            "Tokens of model calls by model and direction.",
            ["model", "direction"],
            registry=r,
        )
        self.llm_cost = Counter("baton_llm_cost_usd", "Spend on model calls, USD.", ["model"], registry=r)
        self.cache_hits = Counter(
            "baton_llm_cache_hits", "Answers from the cache by kind.", ["kind"], registry=r
        )
        self.budget_decisions = Counter(
            "baton_budget_decisions",
            "Model calls under a budget by what it decided: within, downgraded (a cheaper model).",
            ["decision"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "baton_budget_exceeded", "Attempts refused or stopped by a budget.", ["task"], registry=r
        )
        self.queue_depth = Gauge(
            "baton_queue_depth",
            "Jobs and steps waiting or running, by queue and state.",
            ["queue", "state"],
            registry=r,
        )
        self.waves = Gauge(
            "baton_run_waves", "Waves of each run under way (running or paused).", ["run"], registry=r
        )
        self.waves_done = Gauge(
            "baton_run_waves_completed",
            "Waves of each run under way whose steps have all finished.",
            ["run"],
            registry=r,
        )
        self.wave_done_ratio = Gauge(
            "baton_run_current_wave_completion",
            "Share of the steps of each run's lowest unfinished wave that have finished.",
            ["run"],
            registry=r,
        )
        self.workers = Gauge(
            "baton_workers_alive", "Workers whose lease holds, on this database.", registry=r
        )
        # what a monitor compares with the last head it saw (baton audit head): a count that
        # went down, or a last seq that did, is a trail that was cut
        self.audit_entries = Gauge("baton_audit_entries", "Entries on the audit trail.", registry=r)
        self.audit_last_seq = Gauge(
            "baton_audit_last_seq", "The seq of the audit trail's newest entry (0: none).", registry=r
        )
        self._run_started: dict[str, float] = {}
        self._run_spent: dict[str, float] = {}
        self.unsubscribe = engine.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        kind, data = event.kind, event.data
        if kind.startswith("step."):
            self._step(kind.removeprefix("step."), event.run_id, data)
        elif kind == "run.running":
            self._run_started.setdefault(event.run_id, event.ts)
        elif kind in ("run.completed", "run.failed", "run.cancelled"):
            self.runs.labels(kind.removeprefix("run.")).inc()
            started = self._run_started.pop(event.run_id, None)
            if started is not None:
                self.run_seconds.observe(max(0.0, event.ts - started))
                self.run_cost.observe(self._run_spent.pop(event.run_id, 0.0))

    def _step(self, outcome: str, run_id: str, data: dict[str, Any]) -> None:
        task = str(data.get("task") or "unknown")
        if outcome == "running":
            self.started.labels(task).inc()
            self.running.inc()
            waited = data.get("waited_s")
            if isinstance(waited, int | float):
                self.waited.labels(task).observe(waited)
            return
        if outcome not in OUTCOMES:
            return  # ready, skipped: no attempt
        self.running.dec()
        self.attempts.labels(task, outcome).inc()
        if outcome == "retrying":
            self.retries.labels(task).inc()
        duration = data.get("duration_s")
        if isinstance(duration, int | float):
            self.step_seconds.labels(task).observe(duration)
        error = data.get("error")
        if isinstance(error, str) and "budget" in error.lower():
            self.budget_refusals.labels(task).inc()
        call = data.get("llm")
        if isinstance(call, dict) and call.get("model"):
            self._model_call(run_id, call)

    def _model_call(self, run_id: str, call: dict[str, Any]) -> None:
        model = str(call["model"])
        source = str(call.get("source") or "llm")
        self.llm_calls.labels(model, source).inc()
        if source == "cached":
            self.cache_hits.labels(str(call.get("cache") or "exact")).inc()
        usage = call.get("usage")
        if isinstance(usage, dict) and source != "cached":
            for direction, key in (("input", "input_tokens"), ("output", "output_tokens")):
                value = usage.get(key)
                if isinstance(value, int) and value > 0:
                    self.llm_tokens.labels(model, direction).inc(value)
        cost = call.get("cost_usd")
        if isinstance(cost, int | float) and cost > 0:
            self.llm_cost.labels(model).inc(cost)
            if run_id in self._run_started:  # observed at the run's end
                self._run_spent[run_id] = self._run_spent.get(run_id, 0.0) + cost
        decision = call.get("budget")
        if decision in ("within", "downgraded"):
            self.budget_decisions.labels(decision).inc()

    async def refresh(self, store: Store, now: float) -> None:
        """What the store says now (at each scrape): the queue's depth, how far the runs
        under way are through their waves, the live workers."""
        self.queue_depth.clear()
        for queue, state, count in await store.queue_depth():
            self.queue_depth.labels(queue, state).set(count)
        for gauge in (self.waves, self.waves_done, self.wave_done_ratio):
            gauge.clear()  # runs that ended since the last scrape drop out
        runs: dict[str, list[tuple[int, int]]] = {}
        for run_id, _wave, steps, finished in await store.wave_progress():
            runs.setdefault(run_id, []).append((steps, finished))
        for run_id, waves in runs.items():
            self.waves.labels(run_id).set(len(waves))
            self.waves_done.labels(run_id).set(sum(1 for steps, finished in waves if finished == steps))
            current = next(((s, f) for s, f in waves if f < s), None)
            self.wave_done_ratio.labels(run_id).set(1.0 if current is None else current[1] / current[0])
        self.workers.set(sum(1 for w in await store.list_workers() if w.expires_at >= now))
        entries, newest = await store.audit_tail()
        self.audit_entries.set(entries)
        self.audit_last_seq.set(newest.seq if newest is not None else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self.unsubscribe()


__all__ = ["CONTENT_TYPE", "Metrics"]
