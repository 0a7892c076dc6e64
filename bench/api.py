"""REST API benchmark: a real `baton serve` process on the embedded default (SQLite).

Prints one JSON document.

    python bench/api.py [--repeat 3] [--clients 50] [--seconds 5]

- ``runs_started_per_s``: 500 one-step plans POSTed by 16 concurrent clients (each answer
  is a 202 with the run written and queued), from the first request to the last answer;
- ``get_run_p50_ms`` / ``_p99_ms``: ``GET /api/v1/runs/{id}`` (a run of 10 steps) by
  ``--clients`` concurrent clients for ``--seconds``, each asking again as soon as it has
  its answer (the latency is then the clients' number over the server's throughput);
  ``polling_get_run_*``: the same clients each asking every 250 ms, as pages following
  runs do;
- ``sse_delivery_p50_ms`` / ``_p99_ms``: from an event's time in the store (its commit)
  to a Server-Sent Events client reading it, over runs of sleep steps followed live;
- ``nats_execute_p50_ms`` / ``_p99_ms``: the NATS ``baton.execute`` round trip of the echo
  task, when the NATS interface and a server are there.

Server and clients share the machine's two cores: the figures include the clients' own
work. Figures are medians over ``--repeat`` rounds, each on a fresh database.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

BATON = [sys.executable, "-m", "baton"]
ONE_STEP = {"name": "one", "steps": [{"id": "a", "task": "echo", "with": {"n": 1}}]}
TEN_STEPS = {"name": "ten", "steps": [{"id": f"s{i}", "task": "echo"} for i in range(10)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Served:
    def __init__(self, folder: Path) -> None:
        self.db = folder / "api.db"
        made = subprocess.run(
            [*BATON, "keys", "create", "--role", "operator", "--db", str(self.db), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        self.token = json.loads(made.stdout)["token"]
        self.port = free_port()
        self.nats = nats_reachable()
        extra = ["--nats", NATS_URL] if self.nats else []
        self.proc = subprocess.Popen(
            # the server's own speed: 50 clients on one key are far past its default rate limit
            [*BATON, "serve", "--db", str(self.db), "--port", str(self.port), "--rate-limit", "none", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("baton serve did not start")
            time.sleep(0.1)

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, limits=limits)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def runs_started(served: Served, n: int = 500, clients: int = 16) -> float:
    async with served.client() as client:
        todo = iter(range(n))

        async def one_client() -> None:
            for _ in todo:
                got = await client.post("/runs", json=ONE_STEP)
                if got.status_code != 202:
                    raise SystemExit(f"POST /runs answered {got.status_code}: {got.text}")

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return n / (time.perf_counter() - started)


async def get_latency(
    served: Served, clients: int, seconds: float, interval_s: float = 0.0
) -> tuple[float, float, int]:
    """``clients`` clients asking for one run: back to back (``interval_s`` 0), or each once
    every ``interval_s`` (a page following a run).

    The clients are aiohttp's: httpx spends more CPU per request than the server does, and
    the two share the machine. The clients' own garbage collection is off while they
    measure, so its pauses are not counted as the server's.
    """
    import aiohttp

    async with served.client() as client:
        run_id = (await client.post("/runs", json=TEN_STEPS)).json()["id"]
    await asyncio.sleep(0.5)
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {served.token}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        url = f"{served.url}/runs/{run_id}"
        end = time.monotonic() + seconds

        async def one_client(offset: float) -> None:
            await asyncio.sleep(offset)
            while time.monotonic() < end:
                t = time.perf_counter()
                async with session.get(url) as got:
                    await got.read()
                elapsed = time.perf_counter() - t
                latencies.append(elapsed)
                if got.status != 200:
                    raise SystemExit(f"GET answered {got.status}")
                if interval_s:
                    await asyncio.sleep(max(0.0, interval_s - elapsed))

        gc.disable()
        try:
            await asyncio.gather(*(one_client(interval_s * i / clients) for i in range(clients)))
        finally:
            gc.enable()
    return 1000 * percentile(latencies, 0.5), 1000 * percentile(latencies, 0.99), len(latencies)


async def sse_delivery(served: Served, runs: int = 5) -> tuple[float, float]:
    plan = {
        "name": "sse",
        "policy": {"max_parallel": 2},
        "steps": [{"id": f"s{i}", "task": "sleep", "with": {"seconds": 0.05}} for i in range(20)],
    }
    delays: list[float] = []
    async with served.client() as client:
        for _ in range(runs):
            run_id = (await client.post("/runs", json=plan)).json()["id"]
            async with client.stream("GET", f"/runs/{run_id}/events") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        received = time.time()
                        data = json.loads(line[6:])
                        if data["kind"] in ("run.pending",):
                            continue  # written before the stream was asked for
                        sent = datetime.fromisoformat(data["ts"]).timestamp()
                        delays.append(received - sent)
    return 1000 * percentile(delays, 0.5), 1000 * percentile(delays, 0.99)


NATS_URL = os.environ.get("BATON_NATS", "nats://127.0.0.1:4222")


def nats_reachable() -> bool:
    host, _, port = NATS_URL.removeprefix("nats://").partition(":")
    try:
        with socket.create_connection((host, int(port or 4222)), timeout=1):
            return True
    except OSError:
        return False


async def nats_execute(served: Served, n: int = 500) -> tuple[float, float]:
    """The NATS round trip of ``baton.execute`` (echo) answered by the served process, with
    the operator key every request carries."""
    import nats

    nc = await nats.connect(NATS_URL)
    headers = {"Authorization": f"Bearer {served.token}"}
    try:
        body = json.dumps({"task": "echo", "input": {"n": 1}}).encode()
        deadline = time.monotonic() + 30
        while True:  # until the interface answers
            try:
                await nc.request("baton.execute", body, timeout=1, headers=headers)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise SystemExit("baton.execute got no answer") from None
                await asyncio.sleep(0.2)
        times: list[float] = []
        for _ in range(n):
            t = time.perf_counter()
            reply = await nc.request("baton.execute", body, timeout=5, headers=headers)
            times.append(time.perf_counter() - t)
            if "result" not in json.loads(reply.data):
                raise SystemExit(f"baton.execute answered {reply.data!r}")
    finally:
        await nc.close()
    return 1000 * percentile(times, 0.5), 1000 * percentile(times, 0.99)


def round_(clients: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        served = Served(Path(tmp))
        try:
            out: dict[str, float] = {"runs_started_per_s": asyncio.run(runs_started(served))}
            p50, p99, count = asyncio.run(get_latency(served, clients, seconds))
            out.update(get_run_p50_ms=p50, get_run_p99_ms=p99, get_run_per_s=count / seconds)
            p50, p99, count = asyncio.run(get_latency(served, clients, seconds, interval_s=0.25))
            out.update(
                polling_get_run_p50_ms=p50, polling_get_run_p99_ms=p99, polling_get_run_per_s=count / seconds
            )
            out["sse_delivery_p50_ms"], out["sse_delivery_p99_ms"] = asyncio.run(sse_delivery(served))
            if served.nats:
                out["nats_execute_p50_ms"], out["nats_execute_p99_ms"] = asyncio.run(nats_execute(served))
        finally:
            served.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rounds = [round_(args.clients, args.seconds) for _ in range(args.repeat)]
    median = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    doc = {
        "machine": {"cpus": 2, "python": platform.python_version(), "platform": platform.platform()},
        "clients": args.clients,
        "repeat": args.repeat,
        "median": median,
        "targets": {
            "get_run_p99_ms_at_most": 20.0,
            "get_run_met": median["get_run_p99_ms"] <= 20.0,
            "polling_get_run_met": median["polling_get_run_p99_ms"] <= 20.0,
            "nats_execute_p50_ms_at_most": 2.0,
            "nats_met": median.get("nats_execute_p50_ms", 1e9) <= 2.0,
        },
        "rounds": rounds,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
