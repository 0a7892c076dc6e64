"""A shell step's whole process tree lives and dies with its attempt, with real processes.

Each program here starts a grandchild that leaves its session (``setsid``, or a daemon's
double fork) and, like the main process, writes a marker when it has slept its time: a
marker on disk is work done by a process that outlived its attempt. Pids are read from the
files the processes write; a zombie counts as gone. The waits block, so the async tests run
them in a thread, leaving the event loop to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from baton import Engine
from baton.errors import TaskFailed

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

PY = sys.executable
#: argv: DIR MODE MAIN_S GRAND_S. MODE "setsid": the child starts a session of its own;
#: "daemon": it does that and forks again (the classic double fork), its parent gone.
TREE = """
import os, sys, time
from pathlib import Path
out, mode, main_s, grand_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if os.fork() == 0:
    os.setsid()
    if mode == "daemon" and os.fork():
        os._exit(0)
    (out / "grandchild.pid").write_text(f"{os.getpid()}\\n")
    time.sleep(grand_s)
    (out / "grandchild.marker").write_text("outlived its attempt")
    os._exit(0)
(out / "main.pid").write_text(f"{os.getpid()}\\n")
grandchild = out / "grandchild.pid"
while not (grandchild.exists() and grandchild.read_text().endswith("\\n")):  # it is under way
    time.sleep(0.01)
print("started", flush=True)
time.sleep(main_s)
(out / "main.marker").write_text("outlived its attempt")
"""


def tree(out: Path, mode: str, main_s: float, grand_s: float) -> list[str]:
    return [PY, "-c", TREE, str(out), mode, str(main_s), str(grand_s)]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def read_pid(path: Path, within_s: float = 30) -> int:
    deadline = time.monotonic() + within_s
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path.name} was never written"
        time.sleep(0.02)
    return int(path.read_text())


def still_alive(pids: list[int], within_s: float = 10) -> list[int]:
    """The pids still running after waiting up to ``within_s`` for them to go."""
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def no_marker_after(out: Path, started: float, grand_s: float) -> list[str]:
    """The markers on disk once every process of the tree would have written its own."""
    time.sleep(max(0.0, started + grand_s + 0.5 - time.monotonic()))
    return sorted(p.name for p in out.glob("*.marker"))


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """A directory for the pid files and markers; whatever survived a failing test is killed."""
    directory = tmp_path / "tree"
    directory.mkdir()
    yield directory
    for pid_file in directory.glob("*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine("memory://", poll_s=0.05, workdir=tmp_path) as eng:
        yield eng


async def test_a_timeout_kills_the_grandchild_that_left_the_session(engine: Engine, out: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TaskFailed, match="timed out"):
        await engine.execute("shell", {"argv": tree(out, "setsid", 30, 2), "timeout_s": 1})
    pids = [read_pid(out / "main.pid", within_s=1), read_pid(out / "grandchild.pid", within_s=1)]
    assert await asyncio.to_thread(still_alive, pids) == []
    assert await asyncio.to_thread(no_marker_after, out, started, 2) == []


async def test_a_cancel_kills_the_grandchild_that_left_the_session(engine: Engine, out: Path) -> None:
    handle = await engine.submit(
        {
            "name": "cancelled",
            "steps": [{"id": "tree", "task": "shell", "with": {"argv": tree(out, "setsid", 30, 2)}}],
        }
    )
    pids = [await asyncio.to_thread(read_pid, out / name) for name in ("main.pid", "grandchild.pid")]
    started = time.monotonic()
    await engine.cancel(handle.run_id)
    record = await handle.wait(timeout_s=10)
    assert record.status.value == "cancelled"
    assert await asyncio.to_thread(still_alive, pids) == []
    assert await asyncio.to_thread(no_marker_after, out, started, 2) == []


async def test_a_daemon_holding_stdout_does_not_hold_back_the_timeout(engine: Engine, out: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TaskFailed, match="timed out"):
        await engine.execute("shell", {"argv": tree(out, "daemon", 30, 30), "timeout_s": 1})
    assert time.monotonic() - started < 10, "a 1 s timeout waited for the daemon holding stdout"
    assert await asyncio.to_thread(still_alive, [read_pid(out / "grandchild.pid", within_s=1)]) == []


async def test_a_daemon_left_behind_does_not_hold_back_the_result(engine: Engine, out: Path) -> None:
    """The program ends at once and leaves a daemon holding stdout: the step ends with it,
    its output whole, and the daemon goes with the attempt."""
    started = time.monotonic()
    result = await engine.execute("shell", {"argv": tree(out, "daemon", 0, 30), "timeout_s": 20})
    assert time.monotonic() - started < 10, "the result waited for the daemon holding stdout"
    assert result == {"returncode": 0, "stdout": "started\n", "stderr": ""}
    assert await asyncio.to_thread(still_alive, [read_pid(out / "grandchild.pid", within_s=1)]) == []


def test_kill_9_of_baton_run_takes_the_steps_process_tree_with_it(tmp_path: Path, out: Path) -> None:
    plan = tmp_path / "plan.json"
    step = {"id": "tree", "task": "shell", "with": {"argv": tree(out, "setsid", 3, 3)}}
    plan.write_text(json.dumps({"name": "killed", "steps": [step]}))
    run = subprocess.Popen(
        [PY, "-m", "baton", "run", str(plan), "--db", str(tmp_path / "baton.db"), "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pids = [read_pid(out / "main.pid"), read_pid(out / "grandchild.pid")]
        started = time.monotonic()
        assert run.poll() is None, "baton run ended before it could be killed"
    finally:
        run.kill()
        run.wait()
    assert run.returncode == -signal.SIGKILL
    assert still_alive(pids) == [], "the step's processes outlived the runner"
    assert no_marker_after(out, started, 3) == []
