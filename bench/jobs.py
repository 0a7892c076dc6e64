"""The queue on PostgreSQL: worker processes, jobs/s, latency, a plan, and the raw limit.

    python bench/jobs.py [--repeat 3] [--quick] [--db postgresql://...]

Prints one JSON document. Every figure is a median over ``--repeat`` rounds, each on a
fresh schema of the database (default ``$BATON_BENCH_PG``, else the local server):

- ``jobs``: 10,000 no-op jobs (``echo``) drained by 1, 2 and 4 ``baton worker``
  processes, timed from the commit of the (batched) enqueue to the last job's finish;
- ``latency``: enqueue -> start of single jobs enqueued one by one onto 4 idle workers
  (woken by LISTEN/NOTIFY), p50 and p99, from the rows' own timestamps;
- ``plan``: a 10,000-step random DAG run by 4 worker processes;
- ``raw``: the bare ``FOR UPDATE SKIP LOCKED`` claim + complete loop, in batches of the
  workers' size, by 4 processes on a table of the same number of rows; and the ratio of
  the 4-worker jobs/s to it, measured in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from baton import Engine
from baton.runtime import tune_gc
from baton.store import NewJob
from baton.store.postgres import PostgresStore

DEFAULT_PG = os.environ.get("BATON_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CONCURRENCY = 64  # per worker process: also the claim batch
WORKER = [sys.executable, "-m", "baton", "worker", "--json", "--grace-s", "0"]


@contextmanager
def schema(url: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextmanager
def workers(url: str, count: int) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` idle `baton worker` processes, each ready (registered) when this yields."""
    procs = [
        subprocess.Popen(
            [*WORKER, "--db", url, "--concurrency", str(CONCURRENCY)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("a worker did not start")
        time.sleep(0.3)  # LISTEN is set up just after the worker registers
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _count(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def drain(url: str, schema_name: str, n: int) -> float:
    """Enqueue ``n`` no-op jobs in one batch; jobs/s until the last one finished."""
    store = PostgresStore(url, schema=schema_name)
    await store.open()
    try:
        jobs = [NewJob("echo", {"i": i}) for i in range(n)]
        committed = time.time()
        await store.enqueue(jobs, committed)
        committed = time.time()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f'SET search_path TO "{schema_name}"')
            deadline = time.monotonic() + 300
            while await _count(conn, "SELECT count(*) FROM steps WHERE status <> 'succeeded'"):
                if time.monotonic() > deadline:
                    raise SystemExit("jobs did not drain within 300 s")
                await asyncio.sleep(0.01)
            last = float(await _count(conn, "SELECT max(finished_at) FROM steps"))
    finally:
        await store.close()
    return n / max(1e-9, last - committed)


async def latency(url: str, schema_name: str, n: int) -> tuple[float, float]:
    """Single enqueues onto idle workers: p50 and p99 of start - enqueue (ms)."""
    store = PostgresStore(url, schema=schema_name)
    await store.open()
    try:
        (first,) = await store.enqueue([NewJob("echo", {"i": -1})], time.time())
        await asyncio.sleep(0.2)
        for i in range(n):
            await store.enqueue([NewJob("echo", {"i": i})], time.time())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f'SET search_path TO "{schema_name}"')
            cur = await conn.execute(
                "SELECT started_at - created_at FROM steps WHERE started_at IS NOT NULL AND id > %s",
                (first.id,),
            )
            waits = sorted(1000 * float(r[0]) for r in await cur.fetchall())
    finally:
        await store.close()
    if len(waits) < n:
        raise SystemExit(f"only {len(waits)} of {n} jobs started")
    return waits[len(waits) // 2], waits[min(len(waits) - 1, int(len(waits) * 0.99))]


def random_dag(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    steps: list[dict[str, Any]] = []
    for i in range(n):
        k = min(i, rng.randint(0, 3))
        needs = sorted({f"n{j}" for j in rng.sample(range(max(0, i - 100), i), k)}) if k else []
        steps.append({"id": f"n{i}", "task": "echo", "needs": needs})
    return steps


async def plan_run(url: str, n: int) -> float:
    """A random DAG of ``n`` steps, submitted here and run by the worker processes."""
    plan = {"name": "bench-plan", "policy": {"max_parallel": 4 * CONCURRENCY}, "steps": random_dag(n)}
    async with Engine(url) as engine:
        handle = await engine.submit(plan, start=False)
        run = await handle.wait(timeout_s=600)
    if run.status != "completed" or run.started_at is None or run.finished_at is None:
        raise SystemExit(f"the plan ended {run.status}: {run.error}")
    return n / (run.finished_at - run.started_at)


RAW_TABLE = "CREATE TABLE raw_jobs (id BIGSERIAL PRIMARY KEY, status TEXT NOT NULL, owner TEXT, output TEXT)"
RAW_INDEX = "CREATE INDEX raw_available ON raw_jobs (id) WHERE status = 'available'"
RAW_CLAIM = """
UPDATE raw_jobs SET status = 'running', owner = %s
WHERE id IN (SELECT id FROM raw_jobs WHERE status = 'available' ORDER BY id
             LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id
"""
RAW_COMPLETE = "UPDATE raw_jobs SET status = 'completed', output = 'null' WHERE id = ANY(%s)"


def raw_child(url: str, schema_name: str, batch: int, start_at: float) -> None:
    """One process of the raw loop: connected, it waits for the common start time, then
    claims a batch and completes it until nothing is left; prints when it finished."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema_name}"')
        owner = str(os.getpid())
        time.sleep(max(0.0, start_at - time.time()))
        while True:
            with conn.transaction():
                ids = [r[0] for r in conn.execute(RAW_CLAIM, (owner, batch)).fetchall()]
            if not ids:
                break
            with conn.transaction():
                conn.execute(RAW_COMPLETE, (ids,))
    print(time.time(), flush=True)


def raw_limit(url: str, schema_name: str, n: int, processes: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema_name}"')
        conn.execute(f'SET search_path TO "{schema_name}"')
        conn.execute(RAW_TABLE)
        conn.execute(RAW_INDEX)
        conn.execute("INSERT INTO raw_jobs (status) SELECT 'available' FROM generate_series(1, %s)", (n,))
        conn.execute("ANALYZE raw_jobs")
    start_at = time.time() + 2.0  # every child connected and waiting by then
    argv = [sys.executable, __file__, "--raw-child", url, schema_name, str(CONCURRENCY), str(start_at)]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    ends = [float(child.communicate()[0].strip()) for child in children]
    return n / (max(ends) - start_at)


def migrate(url: str, name: str) -> None:
    """Create the schema's tables before anything is timed."""

    async def go() -> None:
        store = PostgresStore(url, schema=name)
        await store.open()
        await store.close()

    asyncio.run(go())


def round_(url: str, n: int, latency_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for count in (1, 2, 4):
        with schema(url) as name:
            scoped = f"{url}?schema={name}"
            migrate(url, name)
            with workers(scoped, count):
                out[f"jobs_per_s_{count}_workers"] = asyncio.run(drain(url, name, n))
                if count == 4:
                    out["latency_p50_ms"], out["latency_p99_ms"] = asyncio.run(latency(url, name, latency_n))
    with schema(url) as name:
        scoped = f"{url}?schema={name}"
        migrate(url, name)
        with workers(scoped, 4):
            out["plan_steps_per_s_4_workers"] = asyncio.run(plan_run(scoped, n))
    with schema(url) as name:
        out["raw_skip_locked_per_s"] = raw_limit(url, name, n, 4)
    out["ratio_4_workers_to_raw"] = out["jobs_per_s_4_workers"] / out["raw_skip_locked_per_s"]
    return out


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, 2,000 jobs")
    parser.add_argument("--db", default=DEFAULT_PG)
    parser.add_argument(
        "--raw-child", nargs=4, metavar=("URL", "SCHEMA", "BATCH", "START"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.raw_child:
        url, name, batch, start_at = args.raw_child
        raw_child(url, name, int(batch), float(start_at))
        return
    tune_gc()
    n = 2_000 if args.quick else 10_000
    repeat = 1 if args.quick else args.repeat
    rounds = [round_(args.db, n, 50 if args.quick else 200) for _ in range(repeat)]
    medians = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "postgres": server_version(args.db),
        "jobs": n,
        "worker_concurrency": CONCURRENCY,
        "repeat": repeat,
        "median": medians,
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
