"""Engine benchmark: throughput, latency, makespan and memory, durable on SQLite.

Prints one JSON document. Figures are medians over --repeat runs, each on a fresh
database file; ratios compare figures measured in the same process.

    python bench/engine.py [--repeat 5] [--quick]

(a) fan-out/fan-in of 10,000 no-op steps, (b) a chain of 1,000, (c) a random DAG of
10,000: steps/s from submit (validation and writing the run included) to the run's end,
and ready->start latency (from the commit that made a step startable to its handler
starting). Beside them, the raw SQLite limit on the same file settings: a bare loop that
claims and completes rows with no engine around it, per row and in batches.
(d) makespan of a random DAG of sleep steps under max_parallel 8, against the lower bound
max(critical path, total work / 8) and against barrier: wave.
(e) peak RSS of a process that runs a 100,000-step plan.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baton import Engine, RunStatus
from baton.runtime import GC_THRESHOLDS, tune_gc


def fan_out(n: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"id": "root", "task": "echo"}]
    steps += [{"id": f"s{i}", "task": "echo", "needs": ["root"]} for i in range(n)]
    steps.append({"id": "sink", "task": "echo", "needs": [f"s{i}" for i in range(n)]})
    return steps


def chain(n: int) -> list[dict[str, Any]]:
    return [{"id": f"c{i}", "task": "echo", "needs": [f"c{i - 1}"] if i else []} for i in range(n)]


def random_dag(
    n: int, seed: int, task: str = "echo", window: int = 200, max_needs: int = 3
) -> list[dict[str, Any]]:
    """Each step needs 0..max_needs random earlier steps among the previous ``window``."""
    rng = random.Random(seed)
    steps: list[dict[str, Any]] = []
    for i in range(n):
        k = min(i, rng.randint(0, max_needs))
        needs = sorted({f"n{j}" for j in rng.sample(range(max(0, i - window), i), k)}) if k else []
        steps.append({"id": f"n{i}", "task": task, "needs": needs})
    return steps


async def timed_run(db: Path, name: str, steps: list[dict[str, Any]], max_parallel: int) -> dict[str, float]:
    plan = {"name": name, "policy": {"max_parallel": max_parallel}, "steps": steps}
    async with Engine(str(db), measure_latency=True) as engine:
        started = time.perf_counter()
        handle = await engine.submit(plan)
        worker = handle.worker
        assert worker is not None
        record = await handle.wait()
        elapsed = time.perf_counter() - started
    if record.status is not RunStatus.COMPLETED:
        raise SystemExit(f"{name}: run ended {record.status}: {record.error}")
    lat = sorted(worker.start_latencies or [0.0])
    return {
        "steps_per_s": len(steps) / elapsed,
        "seconds": elapsed,
        "latency_p50_ms": 1000 * lat[len(lat) // 2],
        "latency_p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def raw_sqlite(db: Path, n: int, batch: int) -> float:
    """Claim+complete ``n`` rows with bare SQL on the engine's file settings; rows/s."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA busy_timeout = 10000")
    con.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, owner TEXT, output TEXT)")
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT INTO jobs (id, status) VALUES (?, 'ready')", ((i,) for i in range(n)))
    con.execute("COMMIT")
    started = time.perf_counter()
    for lo in range(0, n, batch):
        ids = [(i,) for i in range(lo, min(n, lo + batch))]
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "UPDATE jobs SET status = 'running', owner = 'w' WHERE id = ? AND status = 'ready'", ids
        )
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "UPDATE jobs SET status = 'done', output = '{}' WHERE id = ? AND status = 'running'", ids
        )
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return n / elapsed


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(s[k] for s in samples), 3) for k in samples[0]}


async def throughput(tmp: Path, repeat: int) -> dict[str, Any]:
    cases = {
        "fan_out_10000": (fan_out(10_000), 64),
        "chain_1000": (chain(1000), 8),
        "random_dag_10000": (random_dag(10_000, seed=7), 64),
    }
    out: dict[str, Any] = {}
    raw_loop: list[float] = []
    raw_batched: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for name, (steps, max_parallel) in cases.items():
        for r in range(repeat):
            runs[name].append(await timed_run(tmp / f"{name}-{r}.db", name, steps, max_parallel))
    for r in range(repeat):
        raw_loop.append(raw_sqlite(tmp / f"raw-loop-{r}.db", 10_000, 1))
        raw_batched.append(raw_sqlite(tmp / f"raw-batch-{r}.db", 10_000, 256))
    for name, samples in runs.items():
        out[name] = {"max_parallel": cases[name][1], **median_of(samples)}
    loop_limit, batch_limit = statistics.median(raw_loop), statistics.median(raw_batched)
    out["raw_sqlite"] = {
        "claim_complete_loop_per_s": round(loop_limit),
        "claim_complete_batched_256_per_s": round(batch_limit),
    }
    fan = out["fan_out_10000"]["steps_per_s"]
    out["ratio_fan_out_to_raw_loop"] = round(fan / loop_limit, 3)
    out["ratio_fan_out_to_raw_batched"] = round(fan / batch_limit, 3)
    return out


async def makespan(tmp: Path, repeat: int) -> dict[str, Any]:
    rng = random.Random(11)
    steps = random_dag(300, seed=11, task="sleep", window=40, max_needs=3)
    for s in steps:
        s["with"] = {"seconds": round(rng.uniform(0.02, 0.1), 3)}
    durations = {s["id"]: s["with"]["seconds"] for s in steps}
    finish: dict[str, float] = {}
    for s in steps:  # steps are in topological order
        finish[s["id"]] = durations[s["id"]] + max((finish[n] for n in s["needs"]), default=0.0)
    critical, work = max(finish.values()), sum(durations.values())
    bound = max(critical, work / 8)
    dataflow: list[float] = []
    wave: list[float] = []
    for r in range(repeat):
        for barrier, sink in (("none", dataflow), ("wave", wave)):
            plan = {
                "name": f"makespan-{barrier}",
                "policy": {"max_parallel": 8, "barrier": barrier},
                "steps": steps,
            }
            async with Engine(str(tmp / f"makespan-{barrier}-{r}.db")) as engine:
                started = time.perf_counter()
                record = await engine.run(plan)
                sink.append(time.perf_counter() - started)
            assert record.status is RunStatus.COMPLETED, record.error
    df, wv = statistics.median(dataflow), statistics.median(wave)
    return {
        "steps": len(steps),
        "max_parallel": 8,
        "critical_path_s": round(critical, 3),
        "total_work_s": round(work, 3),
        "lower_bound_s": round(bound, 3),
        "dataflow_s": round(df, 3),
        "wave_barrier_s": round(wv, 3),
        "dataflow_over_bound": round(df / bound - 1, 4),
        "dataflow_shorter_than_wave": round(1 - df / wv, 4),
    }


def peak_rss(tmp: Path, steps: int) -> dict[str, Any]:
    """Run a big random DAG in a child process (this script again) and read its peak RSS."""
    started = time.perf_counter()
    argv = [sys.executable, __file__, "--rss-child", str(steps), str(tmp / "big.db")]
    if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
        argv.append("--default-gc")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or "completed" not in proc.stdout:
        raise SystemExit(f"peak RSS run failed: {proc.stdout} {proc.stderr}")
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"steps": steps, "peak_rss_mib": round(kib / 1024, 1), "seconds": round(elapsed, 2)}


async def rss_child(steps: int, db: str) -> None:
    async with Engine(db) as engine:
        plan = {"name": "big", "policy": {"max_parallel": 32}, "steps": random_dag(steps, seed=3)}
        record = await engine.run(plan)
    print(record.status)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, smaller memory run")
    parser.add_argument("--rss-child", nargs=2, metavar=("STEPS", "DB"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's GC thresholds (the CLI raises them)"
    )
    args = parser.parse_args()
    if not args.default_gc:
        tune_gc()
    if args.rss_child:
        asyncio.run(rss_child(int(args.rss_child[0]), args.rss_child[1]))
        return
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as tmp_name:
        tmp = Path(tmp_name)
        result: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "platform": platform.platform(),
            },
            "repeat": repeat,
            "gc": "default" if args.default_gc else "tuned as the baton CLI does (baton.runtime.tune_gc)",
        }
        result["throughput"] = asyncio.run(throughput(tmp, repeat))
        result["makespan"] = asyncio.run(makespan(tmp, max(1, min(repeat, 3))))
        result["memory"] = peak_rss(tmp, 20_000 if args.quick else 100_000)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
