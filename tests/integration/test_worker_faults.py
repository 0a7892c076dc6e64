"""Real `baton worker` and `baton run` processes against faults they cannot prevent: a task
that kills its worker, a task that calls sys.exit, a disk that fills up under the run.

A worker that dies is restarted by the test, as a supervisor (systemd, Kubernetes) would.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

TASKS = """
import os, sys, time
import baton

@baton.task(name="crash.exit")
def die() -> str:
    os._exit(1)  # what a segfault in native code, or an OOM kill, looks like from outside

@baton.task(name="crash.sys_exit")
def sys_exit() -> str:
    sys.exit(3)

@baton.task(name="crash.slow")
def slow(key: str, seconds: float = 0.5) -> str:
    time.sleep(seconds)
    with open(os.environ["SIDEFX_LOG"], "a") as f:
        f.write(key + "\\n")
    return key

@baton.task(name="crash.blob")
def blob(n: int, kib: int = 256) -> str:
    return str(n) * (kib * 1024)
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "crashtasks.py").write_text(TASKS)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "SIDEFX_LOG": str(tmp_path / "effects.log")}


def _baton(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _jobs(db: Path) -> dict[str, dict[str, object]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT id, task, args, status, error, attempt FROM steps WHERE run_id IS NULL")
        return {f"{r['task']}:{r['args']}": dict(r) for r in rows}
    finally:
        con.close()


def _supervise(db: Path, env: dict[str, str], done: int, restarts: int = 8) -> list[int]:
    """Run `baton worker` until ``done`` jobs have ended, restarting it when it dies; the
    exit codes of the workers that died."""
    codes: list[int] = []
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.Popen(
            [sys.executable, "-m", "baton", "worker", "--db", str(db), "--import", "crashtasks"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while proc.poll() is None:
                ended = [j for j in _jobs(db).values() if j["status"] in ("succeeded", "failed")]
                if len(ended) >= done:
                    proc.terminate()
                    assert proc.wait(30) == 0
                    return codes
                assert time.monotonic() < deadline, f"the jobs did not end: {_jobs(db)}"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        codes.append(proc.returncode)
        assert len(codes) <= restarts, f"the worker died {len(codes)} times: {_jobs(db)}"


def test_a_task_that_kills_its_worker_is_discarded_and_its_batch_mates_complete(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "baton.db"
    # Enqueued before any worker runs, so that the first claim takes them in one batch.
    enqueue = ["jobs", "enqueue", "--db", str(db), "--import", "crashtasks", "--max-attempts", "2"]
    assert _baton(*enqueue, "crash.exit", env=env).returncode == 0
    for n in range(5):
        assert _baton(*enqueue, "crash.slow", "-i", json.dumps({"key": f"mate-{n}"}), env=env).returncode == 0

    codes = _supervise(db, env, done=6)

    jobs = _jobs(db)
    killer = jobs["crash.exit:{}"]
    assert killer["status"] == "failed"  # discarded
    assert isinstance(killer["error"], str) and killer["error"].startswith("worker died ")
    assert killer["error"].endswith(" times running it")
    mates = {k: j for k, j in jobs.items() if k.startswith("crash.slow")}
    assert {j["status"] for j in mates.values()} == {"succeeded"}, mates
    assert len(codes) >= 2 and set(codes) == {1}  # it did kill its worker, more than once
    effects = (tmp_path / "effects.log").read_text().split()
    assert sorted(set(effects)) == [f"mate-{n}" for n in range(5)]


def test_sys_exit_in_a_task_fails_its_attempt_and_the_worker_runs_on(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "baton.db"
    enqueue = ["jobs", "enqueue", "--db", str(db), "--import", "crashtasks", "--max-attempts", "2"]
    assert _baton(*enqueue, "crash.sys_exit", env=env).returncode == 0
    assert _baton(*enqueue, "crash.slow", "-i", '{"key": "after", "seconds": 0}', env=env).returncode == 0
    codes = _supervise(db, env, done=2)
    assert codes == []  # the worker never exited
    jobs = _jobs(db)
    assert jobs["crash.sys_exit:{}"]["status"] == "failed"
    assert jobs["crash.sys_exit:{}"]["error"] == "the task raised SystemExit(3)"
    assert jobs["crash.sys_exit:{}"]["attempt"] == 2
    assert jobs['crash.slow:{"key": "after", "seconds": 0}']["status"] == "succeeded"


@pytest.fixture
def small_disk(tmp_path: Path) -> object:
    """A 3 MiB filesystem of the test's own (tmpfs), grown later by remounting it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root and mount(8)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_baton_run_with_a_clear_error_and_resume_finishes(
    small_disk: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    db = small_disk / "baton.db"
    plan = tmp_path / "plan.json"
    steps = [{"id": f"s{n}", "task": "crash.blob", "with": {"n": n % 10}} for n in range(40)]
    plan.write_text(json.dumps({"name": "fills-the-disk", "policy": {"max_parallel": 2}, "steps": steps}))

    started = time.monotonic()
    ran = _baton("run", str(plan), "--db", str(db), "--import", "crashtasks", "--quiet", env=env, timeout=90)
    took = time.monotonic() - started
    assert ran.returncode not in (0, 3), ran.stderr
    assert "disk is full" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr
    assert took < 60  # it stops, rather than hanging until killed

    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], capture_output=True)
    assert grown.returncode == 0, grown.stderr
    con = sqlite3.connect(db)
    try:
        ((run_id,),) = con.execute("SELECT id FROM runs").fetchall()
    finally:
        con.close()
    resumed = _baton("resume", run_id, "--db", str(db), "--import", "crashtasks", "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    shown = json.loads(_baton("show", run_id, "--db", str(db), "--json", env=env).stdout)
    assert shown["status"] == "completed"
    assert {s["status"] for s in shown["steps"]} == {"succeeded"}


def test_resume_without_the_runs_tasks_says_which_instead_of_waiting(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "baton.db"
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {"name": "slow", "steps": [{"id": "a", "task": "crash.slow", "with": {"key": "a", "seconds": 3}}]}
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baton",
            "run",
            str(plan),
            "--db",
            str(db),
            "--import",
            "crashtasks",
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (db.exists() and _running(db)):
        assert proc.poll() is None and time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    (run_id,) = _running(db) or _run_ids(db)
    # The hint repeats what the run's tasks need.
    assert f"baton resume {run_id} --db {db} --import crashtasks" in stderr, stderr

    bare = _baton("resume", run_id, "--db", str(db), env=env, timeout=60)
    assert bare.returncode == 2, bare.stderr
    assert "'crash.slow'" in bare.stderr and "--import" in bare.stderr
    resumed = _baton("resume", run_id, "--db", str(db), "--import", "crashtasks", "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr


def _running(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT DISTINCT run_id FROM steps WHERE status = 'running'")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def _run_ids(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT id FROM runs")]
    finally:
        con.close()


def test_a_sync_task_past_its_timeout_does_not_hold_the_worker_after_sigterm(
    tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "baton.db"
    enqueue = ["jobs", "enqueue", "--db", str(db), "--import", "crashtasks", "--max-attempts", "1"]
    stuck = ["-i", '{"key": "stuck", "seconds": 600}', "--timeout-s", "1"]
    assert _baton(*enqueue, "crash.slow", *stuck, env=env).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "worker", "--db", str(db), "--import", "crashtasks", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while next(iter(_jobs(db).values()))["status"] != "failed":
            assert time.monotonic() < deadline, "the attempt did not time out"
            time.sleep(0.05)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)  # its thread sleeps on for ten minutes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    stopped = json.loads(out.splitlines()[-1])
    assert (stopped["event"], stopped["abandoned"]) == ("stopped", 1)
    job = next(iter(_jobs(db).values()))
    assert isinstance(job["error"], str) and "timed out after 1" in job["error"]
