"""Chaos on the database: a PostgreSQL server of the test's own restarted every 2-5 s, its
stops alternately ``immediate`` (a crash: the next start recovers) and ``fast`` (clients
cut, a clean shutdown), down 0.5-1.5 s each time, while two `baton worker` processes drain
a stream of standalone jobs and small plans enqueued by a producer that retries what the
restarts make fail.

Every step is a shell step that appends its idempotency key to a side-effect file, so the
file shows which attempts ran. Passing means: every item completes, with the same two
worker processes (none restarted by hand); no committed item runs again; an item ran more
than once only if its history shows an attempt lost with its worker, and those duplicates
are counted and reported, with the restarts, the items and the time from a restart's end
to the next completion.

``BATON_CHAOS_S`` sets how long the chaos lasts (60 s by default, as in ``make test``); the
long run, whose figures the README quotes::

    BATON_CHAOS_S=1800 .venv/bin/pytest -q tests/integration/test_pg_restarts.py -s

It prints its figures as one JSON line; ``BATON_CHAOS_SEED`` picks another sequence of
restarts, and ``BATON_CHAOS_DEBUG=1`` also prints each restart (mode, when, down for how
long, recovered in how long).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from tests.pgcluster import PgCluster, StopMode, pg_cluster

from baton import Engine
from baton.errors import StoreError
from baton.store import AttemptRecord
from baton.store.postgres import PostgresStore

CHAOS_S = float(os.environ.get("BATON_CHAOS_S", "60"))
WORKERS = 2
CONCURRENCY = 8
SCHEMA = "chaos"
#: the producer's pace: a call every this many seconds, every PLAN_EVERY-th a plan
PACE_S = 0.05
PLAN_EVERY = 8
#: how long the workers get to finish what is left once the chaos stops (a liveness bound,
#: not a timing assertion: a healthy drain takes seconds)
DRAIN_S = 180.0
#: a producer call failing for this long in a row means the database never came back
GIVE_UP_S = 120.0
#: the step: a short wait (so that restarts find attempts in flight), then the side effect
SCRIPT = 'sleep "$1"; echo "$BATON_IDEMPOTENCY_KEY" >> "$EFFECTS"'

T = TypeVar("T")


@dataclass
class Restart:
    mode: StopMode
    stopped_at: float  # time.time(), comparable with the store's timestamps
    down_s: float
    #: from the server accepting connections again to the next completion it recorded;
    #: None when none came before the next restart
    recovery_s: float | None = None


@dataclass
class Submitted:
    jobs: dict[int, str] = field(default_factory=dict)  # job id -> its side-effect key
    runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> its step ids
    calls: int = 0
    #: calls that failed and were made again
    retried: int = 0
    #: of those, the ones whose first try had in fact committed (the retry found the item)
    committed_before: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: the last failures (time.time(), message), for the report of a call that never succeeded
    failures: list[tuple[float, str]] = field(default_factory=list)


class Chaos(threading.Thread):
    """Restarts the cluster until told to stop; leaves it running."""

    def __init__(self, cluster: PgCluster, seed: int) -> None:
        super().__init__(name="pg-chaos", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.restarts: list[Restart] = []
        self.error: BaseException | None = None
        self._modes: itertools.cycle[StopMode] = itertools.cycle(("immediate", "fast"))

    def run(self) -> None:
        try:
            while True:
                until = time.monotonic() + self.rng.uniform(2.0, 5.0)
                self._watch(until)
                if self.halt.is_set():
                    return
                mode = next(self._modes)
                stopped_at, t0 = time.time(), time.monotonic()
                self.cluster.stop(mode)
                time.sleep(self.rng.uniform(0.5, 1.5))
                self.cluster.start()  # (returns once it accepts connections)
                self.restarts.append(Restart(mode, stopped_at, time.monotonic() - t0))
        except BaseException as exc:
            self.error = exc
            if not self.cluster.running:
                self.cluster.start()

    def _watch(self, until: float) -> None:
        """Until ``until`` (or told to stop): measure the last restart's recovery, the
        first change of the count of succeeded items since the server came back."""
        last = self.restarts[-1] if self.restarts else None
        up = time.monotonic()
        if last is None:
            self.halt.wait(max(0.0, until - up))
            return
        try:
            with psycopg.connect(self.cluster.url(), connect_timeout=5, autocommit=True) as conn:
                query = f'SELECT count(*) FROM "{SCHEMA}".steps WHERE status = %s'

                def succeeded() -> int:
                    row = conn.execute(query, ("succeeded",)).fetchone()
                    return int(row[0]) if row else 0

                first = succeeded()
                # Once told to stop, a little longer for this one: the queue is not empty.
                while time.monotonic() < (until if not self.halt.is_set() else up + 30.0):
                    if succeeded() != first:
                        last.recovery_s = time.monotonic() - up
                        break
                    time.sleep(0.02)
        except psycopg.Error:
            pass  # unmeasured (the server is up: the workers' own errors tell more)
        self.halt.wait(max(0.0, until - time.monotonic()))


def _step(key_env: dict[str, str], rng: random.Random, needs: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """A shell step's inputs; those of a step of a plan quote the outputs of its needs (which
    the worker running it reads from the store when another worker ran them)."""
    argv = ["sh", "-c", SCRIPT, "sh", f"{rng.uniform(0.0, 0.3):.3f}"]
    argv += [f"{n}=${{{{ steps.{n}.output.returncode }}}}" for n in needs]
    return {"argv": argv, "env": key_env}


def _plan(n: int, key_env: dict[str, str], rng: random.Random) -> dict[str, Any]:
    """3 to 5 shell steps: a chain, a diamond, or a fan-out and in."""
    shape = rng.choice(
        [
            {"a": [], "b": ["a"], "c": ["b"]},
            {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]},
            {"a": [], "b": ["a"], "c": ["a"], "d": ["a"], "e": ["b", "c", "d"]},
        ]
    )
    steps = [
        {"id": sid, "task": "shell", "needs": needs, "with": _step(key_env, rng, needs)}
        for sid, needs in shape.items()
    ]
    return {"name": f"chaos-{n}", "policy": {"max_parallel": 4}, "steps": steps}


async def _persist(call: Callable[[], Awaitable[T]], submitted: Submitted) -> tuple[T, bool]:
    """The call's result, made again with a backoff while the store fails; whether it had
    to be made again."""
    delay, failing_since = 0.05, time.monotonic()
    retried = False
    while True:
        try:
            return await call(), retried
        except StoreError as exc:
            submitted.errors[type(exc).__name__] += 1
            submitted.failures = [*submitted.failures[-49:], (time.time(), exc.message)]
            if time.monotonic() - failing_since > GIVE_UP_S:
                failures = "\n".join(f"{at:.2f} {message}" for at, message in submitted.failures)
                raise AssertionError(f"a call failed for {GIVE_UP_S:g} s; last tries:\n{failures}") from exc
            retried = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _produce(
    engine: Engine, until: float, effects: Path, alive: Callable[[], None], submitted: Submitted
) -> None:
    """Jobs and plans, one call at a time, until ``until``: an item counts once its call
    returned. Unique keys make a call made again after a failure that had in fact
    committed return the item it made, not a second one."""
    rng = random.Random(5)
    key_env = {"EFFECTS": str(effects)}
    for n in itertools.count():
        if time.monotonic() >= until:
            return
        alive()
        submitted.calls += 1
        if n % PLAN_EVERY == PLAN_EVERY - 1:
            plan = _plan(n, key_env, rng)
            handle, retried = await _persist(
                lambda plan=plan, n=n: engine.submit(plan, start=False, idempotency_key=f"plan-{n}"),
                submitted,
            )
            submitted.runs[handle.run_id] = [s["id"] for s in plan["steps"]]
            submitted.committed_before += retried and not handle.created
        else:
            inputs = _step(key_env, rng)
            job, retried = await _persist(
                lambda inputs=inputs, n=n: engine.enqueue(
                    "shell", inputs, unique_key=f"job-{n}", max_attempts=1
                ),
                submitted,
            )
            submitted.jobs[job.id] = f"job-{job.id}:shell"
            submitted.committed_before += retried and job.duplicate
        submitted.retried += retried
        await asyncio.sleep(PACE_S)


class Workers:
    """The `baton worker` processes, their logs in files."""

    def __init__(self, db: str, cwd: Path) -> None:
        self.cwd = cwd
        self.procs: list[subprocess.Popen[bytes]] = []
        for n in range(WORKERS):
            argv = [sys.executable, "-m", "baton", "worker", "--db", db, "--name", f"w{n}"]
            argv += ["--concurrency", str(CONCURRENCY), "--grace-s", "10", "--json"]
            with open(cwd / f"w{n}.out", "wb") as out, open(cwd / f"w{n}.err", "wb") as err:
                self.procs.append(subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err))

    def logs(self, tail: int = 40) -> str:
        parts = []
        for n, proc in enumerate(self.procs):
            for kind in ("out", "err"):
                lines = (self.cwd / f"w{n}.{kind}").read_text(errors="replace").splitlines()
                shown = "\n".join(lines[-tail:])
                parts.append(f"--- w{n} (pid {proc.pid}, exit {proc.poll()}) std{kind}, last lines:\n{shown}")
        return "\n".join(parts)

    def alive(self) -> None:
        """Fail when a worker exited: none may be restarted by hand."""
        for n, proc in enumerate(self.procs):
            assert proc.poll() is None, f"worker w{n} exited ({proc.returncode}):\n{self.logs()}"

    def events(self) -> Counter[str]:
        """Their log lines, by event (JSON lines on stderr)."""
        seen: Counter[str] = Counter()
        for n in range(len(self.procs)):
            for line in (self.cwd / f"w{n}.err").read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    seen["(lines not JSON: psycopg's own logging)"] += 1
                    continue
                if isinstance(doc, dict) and doc.get("level") in ("warning", "error", "critical"):
                    seen[str(doc.get("event"))] += 1
        return seen

    def stop(self) -> list[int | None]:
        """SIGTERM each (those still running); their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
        return codes


async def _drain(engine: Engine, submitted: Submitted, workers: Workers) -> dict[str, str]:
    """Wait until every submitted item has ended (or DRAIN_S passed); those that did not,
    with their state."""
    jobs, runs = set(submitted.jobs), set(submitted.runs)
    deadline = time.monotonic() + DRAIN_S
    while True:
        workers.alive()
        for job_id in sorted(jobs):
            if (await engine.store.get_job(job_id)).state in ("completed", "discarded", "cancelled"):
                jobs.discard(job_id)
        for run_id in sorted(runs):
            if (await engine.store.get_run(run_id, with_plan=False)).status.terminal:
                runs.discard(run_id)
        if not (jobs or runs) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    stuck: dict[str, str] = {}
    for job_id in sorted(jobs):
        job = await engine.store.get_job(job_id)
        stuck[f"job {job_id}"] = f"{job.state}, attempt {job.attempt}, held by {job.lease_owner}"
    for run_id in sorted(runs):
        steps = await engine.store.get_steps(run_id)
        stuck[f"run {run_id}"] = ", ".join(f"{s.step_id} {s.status} (attempt {s.attempt})" for s in steps)
    return stuck


def _lines(effects: Path) -> Counter[str]:
    return Counter(effects.read_text().split()) if effects.exists() else Counter()


def _judge(
    key: str, status: str, attempt: int, history: list[AttemptRecord], ran: int, problems: list[str]
) -> None:
    """One item: it succeeded; its side effect happened; more than once only if an
    attempt of it was lost with its worker (the runs then number at most its attempts)."""
    lost = sum(1 for a in history if a.status == "lost")
    if status not in ("succeeded", "completed"):
        problems.append(f"{key}: {status} (attempt {attempt}; history {[a.status for a in history]})")
    elif ran == 0:
        problems.append(f"{key}: succeeded, and its side effect never happened")
    elif ran > 1 and not lost:
        problems.append(f"{key}: a committed item ran again ({ran} times, attempt {attempt}, nothing lost)")
    elif ran > attempt:
        problems.append(f"{key}: ran {ran} times in {attempt} attempts")


async def _verify(engine: Engine, submitted: Submitted, effects: Path) -> tuple[dict[str, Any], list[str]]:
    """The figures, and what is wrong."""
    ran = _lines(effects)
    problems: list[str] = []
    keys: set[str] = set()
    lost_attempts = 0
    for job_id, key in submitted.jobs.items():
        job = await engine.store.get_job(job_id)
        history = await engine.store.get_job_attempts(job_id)
        lost_attempts += sum(1 for a in history if a.status == "lost")
        _judge(key, job.state, job.attempt, history, ran[key], problems)
        keys.add(key)
    steps_total = 0
    audit_gaps = 0  # runs whose start or end the audit trail lacks (reported, not judged here)
    for run_id, step_ids in submitted.runs.items():
        run = await engine.store.get_run(run_id, with_plan=False)
        if run.status != "completed":
            problems.append(f"run {run_id}: {run.status} ({run.error})")
        actions = {e.action for e in await engine.store.audit_entries(subject=run_id)}
        audit_gaps += not {"run.start", "run.completed"} <= actions
        steps = {s.step_id: s for s in await engine.store.get_steps(run_id)}
        histories: dict[str, list[AttemptRecord]] = {sid: [] for sid in step_ids}
        for a in await engine.store.get_attempts(run_id):
            histories.setdefault(a.step_id, []).append(a)
        for sid in step_ids:
            key = f"{run_id}:{sid}"
            step = steps[sid]
            lost_attempts += sum(1 for a in histories[sid] if a.status == "lost")
            _judge(key, str(step.status), step.attempt, histories[sid], ran[key], problems)
            keys.add(key)
            steps_total += 1
    strangers = sorted(set(ran) - keys)
    if strangers:
        problems.append(f"side effects of items never submitted: {strangers[:10]}")
    # A call made again after a failure that had committed must not have made a second item.
    in_store = len(await engine.store.list_jobs(limit=1_000_000))
    if in_store != len(submitted.jobs):
        problems.append(f"{in_store} jobs in the store, {len(submitted.jobs)} submitted")
    duplicates = sum(n - 1 for key, n in ran.items() if key in keys and n > 1)
    figures = {
        "jobs": len(submitted.jobs),
        "runs": len(submitted.runs),
        "steps": steps_total,
        "items": len(submitted.jobs) + steps_total,
        "side_effects": sum(ran.values()),
        "duplicates": duplicates,
        "lost_attempts": lost_attempts,
        "audit_gaps": audit_gaps,
    }
    return figures, problems


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_restart_fails_no_call_on_the_pools_dead_connections(mode: StopMode) -> None:
    """The pool's idle connections die with the server; the first calls after it is back
    take none of them (each would have failed its call), however many the pool held."""
    with pg_cluster() as cluster:
        store = PostgresStore(cluster.url(), schema="pool_restart", pool_size=4)
        await store.open()
        try:
            await asyncio.gather(*(store.list_runs() for _ in range(40)))  # the pool grows to 4
            await asyncio.to_thread(cluster.restart, mode)
            for _ in range(8):
                assert await store.list_runs() == []
        finally:
            await store.close()


def test_workers_ride_out_postgres_restarts(tmp_path: Path) -> None:
    effects = tmp_path / "effects.log"
    with pg_cluster() as cluster:
        db = cluster.url(schema=SCHEMA, application_name="baton_chaos")

        async def prepare() -> None:
            async with Engine(db, workdir=tmp_path):  # the schema, migrated before the workers
                pass

        asyncio.run(prepare())
        workers = Workers(db, tmp_path)
        chaos = Chaos(cluster, seed=int(os.environ.get("BATON_CHAOS_SEED", "17")))
        submitted = Submitted()
        report: dict[str, Any] = {"chaos_s": CHAOS_S}

        async def main() -> tuple[dict[str, str], dict[str, Any], list[str]]:
            async with Engine(db, workdir=tmp_path) as engine:
                started = time.monotonic()
                chaos.start()
                try:
                    await _produce(engine, started + CHAOS_S, effects, workers.alive, submitted)
                finally:
                    chaos.halt.set()
                    await asyncio.to_thread(chaos.join)
            report["produced_s"] = round(time.monotonic() - started, 1)
            assert chaos.error is None, f"the chaos thread failed: {chaos.error!r}"
            # Read back on an engine of its own, opened once the server stays up.
            async with Engine(db, workdir=tmp_path) as engine:
                drained = time.monotonic()
                stuck = await _drain(engine, submitted, workers)
                report["drain_s"] = round(time.monotonic() - drained, 1)
                figures, problems = await _verify(engine, submitted, effects)
                return stuck, figures, problems

        try:
            stuck, figures, problems = asyncio.run(main())
            alive = [proc.poll() is None for proc in workers.procs]
        finally:
            chaos.halt.set()
            codes = workers.stop()
        recoveries = [r.recovery_s for r in chaos.restarts]
        measured = [r for r in recoveries if r is not None]
        report.update(figures)
        report.update(
            restarts=len(chaos.restarts),
            immediate=sum(1 for r in chaos.restarts if r.mode == "immediate"),
            fast=sum(1 for r in chaos.restarts if r.mode == "fast"),
            duplicates_per_restart=round(figures["duplicates"] / max(1, len(chaos.restarts)), 3),
            recovery_max_s=round(max(measured), 2) if measured else None,
            recovery_p50_s=round(sorted(measured)[len(measured) // 2], 2) if measured else None,
            recovery_p90_s=round(sorted(measured)[len(measured) * 9 // 10], 2) if measured else None,
            unrecovered_before_next_restart=len(recoveries) - len(measured),
            down_max_s=round(max((r.down_s for r in chaos.restarts), default=0.0), 2),
            producer_calls=submitted.calls,
            producer_retried=submitted.retried,
            producer_retried_had_committed=submitted.committed_before,
            producer_errors=dict(submitted.errors),
            worker_warnings=dict(workers.events()),
            worker_exit_codes=codes,
        )
        if os.environ.get("BATON_CHAOS_DEBUG"):
            print(json.dumps([[r.mode, r.stopped_at, r.down_s, r.recovery_s] for r in chaos.restarts]))
        print(json.dumps(report))
        summary = json.dumps(report, indent=1)
        assert all(alive), f"a worker exited during the test\n{summary}\n{workers.logs()}"
        assert not stuck, f"{len(stuck)} items did not finish: {dict(list(stuck.items())[:20])}\n{summary}"
        assert not problems, f"{len(problems)} problems: {problems[:20]}\n{summary}\n{workers.logs()}"
        assert codes == [0] * WORKERS, f"the workers' exit codes on SIGTERM: {codes}\n{workers.logs()}"
        assert chaos.restarts, "the chaos restarted nothing"
