"""PostgreSQL connections: the pool's size (``pool=N`` in the URL, ``--pool N``), and a
server that refuses connections ("too many clients") waited out instead of failing.

On a cluster of this module's own with few connection slots (``tests.pgcluster``), never
the shared server: the tests fill every slot of it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from tests.pgcluster import PgCluster, free_port, pg_cluster

from baton.errors import StoreError, StoreUnavailable
from baton.store import store_for
from baton.store.postgres import PostgresStore

MAX_CONNECTIONS = 8
BATON = [sys.executable, "-m", "baton"]
RETRY_LINE = "database unavailable; trying again"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with pg_cluster(max_connections=MAX_CONNECTIONS, superuser_reserved_connections=1) as running:
        yield running


def _baton(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BATON, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _connections(cluster: PgCluster, app: str, *, pooled: bool = False) -> int:
    """Backends of ``app``; ``pooled``: only those of the pool (not the LISTEN one, and not
    one whose first statement has not run yet)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    if pooled:
        query += " AND query <> '' AND query NOT LIKE 'LISTEN %%'"
    with psycopg.connect(cluster.url(), connect_timeout=10) as conn:
        row = conn.execute(query, (app,)).fetchone()
    assert row is not None
    return int(row[0])


def _fill(cluster: PgCluster) -> list[psycopg.Connection[tuple[object, ...]]]:
    """Take every connection slot of the server; the refusal that says it is full, checked."""
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        for _ in range(MAX_CONNECTIONS + 1):
            held.append(psycopg.connect(cluster.url(application_name="hog"), connect_timeout=10))
    except psycopg.OperationalError as exc:
        assert "too many clients" in str(exc)
        return held
    for conn in held:
        conn.close()
    raise AssertionError(f"the server took {len(held)} connections, more than max_connections")


def _release(held: list[psycopg.Connection[tuple[object, ...]]]) -> None:
    for conn in held:
        conn.close()
    held.clear()


def _until(
    what: str, ok: Callable[[], bool], proc: subprocess.Popen[str] | None = None, *, within_s: float = 90
) -> None:
    """Poll ``ok`` (generously: these are not timing assertions) while ``proc`` lives."""
    deadline = time.monotonic() + within_s
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {within_s:g} s"
        time.sleep(0.1)


# -- the pool's size -------------------------------------------------------------------------


def test_the_pool_size_comes_from_the_url_or_the_argument() -> None:
    url = "postgresql://u@db.example:5432/baton?schema=jobs&pool=2&sslmode=require"
    from_url = store_for(url)
    assert isinstance(from_url, PostgresStore) and from_url.pool_size == 2
    # pool is baton's: taken out of what libpq sees, like schema
    assert from_url.url == "postgresql://u@db.example:5432/baton?sslmode=require&schema=jobs"
    overridden = store_for(url, pool=3)
    assert isinstance(overridden, PostgresStore) and overridden.pool_size == 3
    default = store_for("postgresql://u@db.example/baton")
    assert isinstance(default, PostgresStore) and default.pool_size == 10


async def test_pool_in_the_url_bounds_the_store(cluster: PgCluster) -> None:
    """200 calls at once through ``pool=2``: all are served, over 2 connections, never more."""
    app = "baton_pool_url"
    store = store_for(cluster.url(application_name=app, schema="pool_url", pool=2))
    await store.open()
    seen: list[int] = []
    try:
        async with await psycopg.AsyncConnection.connect(cluster.url(), autocommit=True) as probe:
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    seen.append(int(row[0]))
                    await asyncio.sleep(0.002)

            async def load() -> None:
                try:
                    await asyncio.gather(*(store.list_runs(limit=5) for _ in range(200)))
                finally:
                    done.set()

            await asyncio.gather(sample(), load())
        assert max(seen) <= 2, seen
        # The pool grew to its bound under that load, and keeps what it opened (idle for now).
        assert _connections(cluster, app) == 2
    finally:
        await store.close()


def test_the_pool_flag_overrides_the_url(cluster: PgCluster, tmp_path: Path) -> None:
    """`baton serve --pool 3` on a URL saying pool=2: concurrent requests get 3 connections
    (and the worker in the process one more, for LISTEN), never more."""
    app = "baton_pool_flag"
    port = free_port()
    db = cluster.url(application_name=app, schema="pool_flag", pool=2)
    argv = [*BATON, "serve", "--db", db, "--pool", "3", "--port", str(port), "--no-auth"]
    with open(tmp_path / "serve.err", "w+") as err:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            base = f"http://127.0.0.1:{port}/api/v1"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{base}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            _until("answer from baton serve", healthy, proc)
            most, most_pooled = 0, 0

            async def burst() -> None:
                async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                    answers = await asyncio.gather(*(client.get("/runs") for _ in range(60)))
                assert all(a.status_code == 200 for a in answers)

            def grown() -> bool:
                nonlocal most, most_pooled
                asyncio.run(burst())
                most = max(most, _connections(cluster, app))
                most_pooled = max(most_pooled, _connections(cluster, app, pooled=True))
                return most_pooled >= 3

            _until("pool of 3 connections", grown, proc)
            assert most <= 4 and most_pooled == 3, (most, most_pooled)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "postgresql://postgres@127.0.0.1:1/x?pool=0"], "pool='0': the pool size must be a whole"),
        (["--db", "postgresql://postgres@127.0.0.1:1/x?pool=abc"], "pool='abc': the pool size must be"),
        (["--db", "postgresql://postgres@127.0.0.1:1/x?pool=-1&schema=s"], "pool='-1'"),
        (["--db", "sqlite:///baton.db", "--pool", "3"], "pool size applies to PostgreSQL only"),
        (["--db", "postgresql://postgres@127.0.0.1:1/x", "--pool", "0"], "Invalid value for '--pool'"),
    ],
)
def test_a_bad_pool_size_is_exit_2_naming_it(args: list[str], message: str, tmp_path: Path) -> None:
    done = _baton("worker", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr  # (rich may wrap the line)


# -- a server that refuses connections --------------------------------------------------------


def test_a_worker_waits_for_a_full_server_then_runs_the_job(cluster: PgCluster, tmp_path: Path) -> None:
    db = cluster.url(application_name="baton_wait", schema="wait")
    enqueued = _baton("jobs", "enqueue", "echo", "-i", '{"text": "hi"}', "--db", db, "--json", cwd=tmp_path)
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = json.loads(enqueued.stdout)["id"]

    def worker(name: str) -> tuple[subprocess.Popen[str], Path]:
        log = tmp_path / f"{name}.err"
        with open(log, "w") as err:
            argv = [*BATON, "worker", "--db", db, "--name", name, "--json"]
            proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, text=True)
        return proc, log

    def retries(log: Path) -> list[dict[str, object]]:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("event") == RETRY_LINE]

    held = _fill(cluster)
    patient, patient_log = worker("patient")
    try:
        # It is refused, says so, and tries again (with a longer wait each time) instead of exiting.
        _until("second retry of the worker", lambda: len(retries(patient_log)) >= 2, patient)
        tries = retries(patient_log)
        assert all("too many clients" in str(t["error"]) for t in tries), tries
        assert float(str(tries[1]["retry_in_s"])) > float(str(tries[0]["retry_in_s"]))
        # Another one, stopped while it waits, exits as a stopped worker does.
        stopped, stopped_log = worker("stopped")
        _until("retry of the second worker", lambda: len(retries(stopped_log)) >= 1, stopped)
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=60) == 0, stopped_log.read_text()
        assert patient.poll() is None
    finally:
        _release(held)
    try:

        def completed() -> bool:
            shown = _baton("jobs", "show", str(job_id), "--db", db, "--json", cwd=tmp_path)
            return shown.returncode == 0 and json.loads(shown.stdout)["state"] == "completed"

        _until("completed job", completed, patient)
        shown = json.loads(_baton("jobs", "show", str(job_id), "--db", db, "--json", cwd=tmp_path).stdout)
        assert shown["output"] == {"text": "hi"}
    finally:
        patient.send_signal(signal.SIGTERM)
        code = patient.wait(timeout=60)
    assert code == 0, patient_log.read_text()


async def test_a_full_server_at_run_time_is_a_store_unavailable_error(cluster: PgCluster) -> None:
    """A store call that finds its connection gone and no slot free raises StoreUnavailable
    (which workers retry), never psycopg's error; once slots free, calls succeed again."""
    app = "baton_run_time"
    url = cluster.url(application_name=app)
    store = PostgresStore(url, schema="run_time", pool_size=1, connect_timeout_s=1)
    await store.open()
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            cut = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
            admin.execute(cut, (app,))
        held = _fill(cluster)
        # The pool's connection was cut (the first call meets that), and it cannot get another.
        errors: list[StoreError] = []
        for _ in range(2):
            with pytest.raises(StoreUnavailable) as caught:
                await store.list_runs()
            errors.append(caught.value)
        assert any("no database connection free in time" in e.message for e in errors), errors
        _release(held)
        deadline = time.monotonic() + 90
        while True:  # the pool reconnects on its own, with a backoff
            try:
                assert await store.list_runs() == []
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not reconnect within 90 s"
                await asyncio.sleep(0.2)
    finally:
        _release(held)
        await store.close()


async def test_a_wrong_database_is_not_waited_for(cluster: PgCluster) -> None:
    """Refusals that trying again will not mend (no such database) are a plain StoreError;
    a server that is not there is StoreUnavailable."""
    wrong = PostgresStore(cluster.url(dbname="no_such_db"), connect_timeout_s=1)
    with pytest.raises(StoreError, match="does not exist") as caught:
        await wrong.open()
    assert not isinstance(caught.value, StoreUnavailable)
    gone = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", connect_timeout_s=1)
    with pytest.raises(StoreUnavailable, match="Connection refused"):
        await gone.open()
