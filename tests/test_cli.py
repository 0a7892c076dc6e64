"""The `baton` command, run for real: a subprocess per command, on an SQLite file in tmp_path.

Commands that race nothing run concurrently (see `_run_all`) to keep the file fast; the
pause/cancel/interrupt tests hold a step open with a gate file instead of racing the clock.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

PLANS = Path(__file__).parent / "plans"
BAD = PLANS / "bad"
TIMEOUT_S = 60


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATON_DB", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "120"
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _cmd(args: Sequence[str | Path]) -> list[str]:
    return [sys.executable, "-m", "baton", *map(str, args)]


def baton(*args: str | Path, cwd: Path | None = None) -> Result:
    done = subprocess.run(
        _cmd(args), env=_env(), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _run_all(commands: Sequence[Sequence[str | Path]], cwd: Path | None = None) -> list[Result]:
    """Run independent commands at once; their results in the same order."""
    procs = [
        subprocess.Popen(
            _cmd(c), env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT_S)
        results.append(Result(p.returncode, out, err))
    return results


def _foreground() -> None:
    """In the child: Ctrl-C at its default, as a terminal's foreground job has it (a test
    run started in the background inherits SIGINT ignored, and baton respects that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str | Path, cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """Start `baton run|resume` in the background; the process and the run id it announces."""
    proc = subprocess.Popen(
        _cmd(args),
        env=_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_foreground,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.match(r"run ([0-9a-f]{20}) started", first)
    if match is None:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no start line: {first!r} {out!r} {err!r}")
    return proc, match.group(1)


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, "the run ended before its gate step started"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen[str]) -> Result:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # its stacks, then killed and its pipes closed
        proc.send_signal(signal.SIGUSR1)  # baton prints every thread's stack on SIGUSR1
        time.sleep(1)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the command did not end within {TIMEOUT_S} s; it printed {out!r} {err!r}")
    return Result(proc.returncode, out, err)


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {s["id"]: s["status"] for s in doc["steps"]}


# -- a database with one completed and one failed run, shared by the read-only tests ------------


@dataclass
class History:
    db: Path
    diamond: Result
    failing: Result


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    db = tmp_path_factory.mktemp("history") / "baton.db"
    diamond = baton("run", PLANS / "diamond.yaml", "--db", db, "--json")
    failing = baton("run", PLANS / "failing.yaml", "--db", db)
    return History(db, diamond, failing)


def _run_ids(db: Path) -> list[str]:
    return [r["id"] for r in baton("runs", "--db", db, "--json").json()["runs"]]


def test_run_completes_and_json_reports_every_step(history: History) -> None:
    result = history.diamond
    assert result.code == 0, result.err
    doc = result.json()  # the whole of stdout is one JSON document
    assert doc["name"] == "diamond"
    assert doc["status"] == "completed"
    assert _statuses(doc) == {"a": "succeeded", "b": "succeeded", "c": "succeeded", "d": "succeeded"}
    outputs = {s["id"]: s["output"] for s in doc["steps"]}
    assert outputs["d"] == {"summary": "about baton", "slept": 0.2}
    assert {s["id"]: s["wave"] for s in doc["steps"]} == {"a": 0, "b": 1, "c": 1, "d": 2}


def test_runs_from_the_command_line_are_on_the_audit_trail_with_their_end(history: History) -> None:
    entries = baton("audit", "list", "--db", history.db, "--json").json()
    by_run: dict[str, list[tuple[str, str]]] = {}
    for e in entries:
        by_run.setdefault(e["subject"], []).append((e["actor"].split(":")[0], e["action"]))
    assert sorted(by_run.values()) == [
        [("cli", "run.start"), ("system", "run.completed")],
        [("cli", "run.start"), ("system", "run.failed")],
    ]
    assert baton("audit", "verify", "--db", history.db).code == 0


def test_failing_run_exits_1_names_the_error_and_skips_dependents(history: History) -> None:
    result = history.failing
    assert result.code == 1
    assert "failed" in result.out
    assert "2 succeeded, 1 failed, 2 skipped" in result.out
    assert "build: compiler exploded (attempt 2)" in result.out
    assert "skipped (a step they need did not succeed): test, release" in result.out
    assert "Traceback" not in result.err


def test_runs_lists_newest_first_and_filters_by_status(history: History) -> None:
    everything, failed, newest, table = _run_all(
        [
            ["runs", "--db", history.db, "--json"],
            ["runs", "--db", history.db, "--json", "--status", "failed"],
            ["runs", "--db", history.db, "--json", "--limit", "1"],
            ["runs", "--db", history.db],
        ]
    )
    runs = everything.json()["runs"]
    assert [(r["name"], r["status"], r["total_steps"]) for r in runs] == [
        ("failing", "failed", 5),
        ("diamond", "completed", 4),
    ]
    assert [r["name"] for r in failed.json()["runs"]] == ["failing"]
    assert [r["name"] for r in newest.json()["runs"]] == ["failing"]
    assert table.code == 0
    for r in runs:
        assert r["id"] in table.out  # ids are printed whole, never cut to fit
        assert r["status"] in table.out


def test_show_resolves_an_id_prefix_and_lists_steps_and_retries(history: History) -> None:
    failing_id = _run_ids(history.db)[0]
    prefix = failing_id[:-4]
    as_json, as_text, ambiguous = _run_all(
        [
            ["show", prefix, "--db", history.db, "--json"],
            ["show", prefix, "--db", history.db],
            ["show", failing_id[:4], "--db", history.db],  # both runs start with the same time digits
        ]
    )
    doc = as_json.json()
    assert doc["id"] == failing_id
    assert doc["status"] == "failed"
    assert _statuses(doc) == {
        "fetch": "succeeded",
        "build": "failed",
        "test": "skipped",
        "release": "skipped",
        "lint": "succeeded",
    }
    build = next(s for s in doc["steps"] if s["id"] == "build")
    assert build["attempts"] == 2
    assert build["error"] == "compiler exploded (attempt 2)"
    assert [
        (a["step"], a["attempt"], a["status"], a["error"]) for a in doc["attempts"] if a["step"] == "build"
    ] == [
        ("build", 1, "failed", "compiler exploded (attempt 1)"),
        ("build", 2, "failed", "compiler exploded (attempt 2)"),
    ]

    assert as_text.code == 0
    assert f"run {failing_id} (failing): failed" in as_text.out
    assert re.search(
        r"fetch\s+0\s+succeeded\s+1\s+\S+\s+\{\"url\": \"https://example.invalid\"\}", as_text.out
    )
    assert "release skipped: needs 'build', which did not succeed" in as_text.out
    assert "build #1: failed" in as_text.out and "compiler exploded (attempt 1)" in as_text.out

    assert ambiguous.code == 2
    assert "ambiguous" in ambiguous.err


def test_a_bad_plan_adds_nothing_to_an_existing_database(history: History) -> None:
    before = _run_ids(history.db)
    result = baton("run", BAD / "cycle.yaml", "--db", history.db)
    assert result.code == 2
    assert _run_ids(history.db) == before


# -- run options -----------------------------------------------------------------------------------


def test_run_without_a_terminal_prints_no_live_display_only_the_summary(tmp_path: Path) -> None:
    result = baton("run", PLANS / "diamond.yaml", "--db", tmp_path / "b.db")
    assert result.code == 0
    lines = result.out.splitlines()
    assert re.fullmatch(r"run [0-9a-f]{20} started: diamond, 4 steps, max_parallel 4", lines[0])
    assert re.fullmatch(r"run [0-9a-f]{20} \(diamond\): completed in \d+\.\ds", lines[1])
    assert lines[2:] == [
        "  steps: 4 succeeded, 0 failed, 0 skipped (4 total)",
        "  result of d:",
        '    {"summary": "about baton", "slept": 0.2}',
    ]
    assert "\x1b[" not in result.out


def test_max_parallel_overrides_the_plan(tmp_path: Path) -> None:
    result = baton("run", PLANS / "parallel.yaml", "--db", tmp_path / "b.db", "--max-parallel", "1", "--json")
    assert result.code == 0
    spans = sorted((_time(s["started_at"]), _time(s["finished_at"])) for s in result.json()["steps"])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "steps overlapped although --max-parallel 1"


def test_import_registers_user_tasks(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    plan = PLANS / "greet.yaml"
    without, with_it, broken = _run_all(
        [
            ["run", plan, "--db", db],
            ["run", plan, "--db", tmp_path / "c.db", "--import", "greetings", "--json"],
            ["run", plan, "--db", db, "--import", "no_such_module_here"],
        ],
        cwd=PLANS,  # modules in the working directory can be imported, as with `python -m`
    )
    assert without.code == 2
    assert "unknown task 'greetings.hello' in step 'hello'" in without.err
    assert with_it.code == 0, with_it.err
    assert with_it.json()["steps"][0]["output"] == "hello, baton"
    assert broken.code == 2
    assert "cannot import module 'no_such_module_here'" in broken.err
    assert not db.exists()


def test_live_progress_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        _cmd(["run", PLANS / "diamond.yaml", "--db", tmp_path / "b.db"]),
        env={**_env(), "TERM": "xterm"},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(controller)
        proc.wait(timeout=TIMEOUT_S)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0
    assert re.search(r"wave\s+progress\s+done\s+running\s+failed\s+skipped\s+steps", screen)
    assert re.search(r"4/4 done · 0 running · 0 failed · 0 retries · elapsed \d+\.\ds · ETA", screen)
    assert re.search(r"\n\s*1\s+━+\s+2\s+0\s+0\s+0\s+2", screen), "wave 1: both steps done"
    assert "(diamond): completed" in screen


# -- validate --------------------------------------------------------------------------------------


def test_validate_prints_waves_critical_path_and_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "never" / "b.db"
    wide = tmp_path / "wide.yaml"
    wide.write_text(
        json.dumps({"name": "wide", "steps": [{"id": f"s{i:02d}", "task": "echo"} for i in range(20)]})
    )
    text, as_json, wide_text = _run_all(
        [
            ["validate", PLANS / "diamond.yaml", "--db", db],
            ["validate", PLANS / "diamond.yaml", "--db", db, "--json"],
            ["validate", wide, "--db", db],
        ]
    )
    assert text.code == 0
    assert "plan diamond" in text.out and "valid" in text.out
    assert "steps: 4, waves: 3, max_parallel: 4" in text.out
    assert "    0: a\n    1: b, c\n    2: d\n" in text.out
    assert "critical path: a -> b -> d (3 steps" in text.out

    doc = as_json.json()
    assert doc["valid"] is True
    assert doc["steps"] == 4
    assert doc["waves"] == [["a"], ["b", "c"], ["d"]]
    assert doc["critical_path"]["steps"] == ["a", "b", "d"]
    assert doc["critical_path"]["length"] == 3
    assert doc["max_parallel"] == 4

    assert "0: s00, s01, s02, s03, s04, s05, s06, s07 … (+12 more)" in wide_text.out
    assert "max_parallel: 8" in wide_text.out
    assert not db.parent.exists(), "validate must not create the database"


# -- bad input -------------------------------------------------------------------------------------


def _literal(*texts: str) -> list[str]:
    return [re.escape(t) for t in texts]


#: kind -> (plan file, patterns every one of which the listed problems must match)
BAD_PLANS: dict[str, tuple[Path, list[str]]] = {
    # Any rotation of the cycle names it; the independent step `d` is not part of it.
    "cycle": (BAD / "cycle.yaml", [r"cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"]),
    "unknown needs": (
        BAD / "unknown_needs.yaml",
        _literal("steps[1].needs: unknown step 'compile' in needs of 'test'"),
    ),
    "duplicate ids": (
        BAD / "duplicate_ids.yaml",
        _literal("steps[2].id: duplicate step id 'build' (first at steps[0])"),
    ),
    "unknown task": (
        BAD / "unknown_task.yaml",
        _literal("steps[0].task: unknown task 'no.such.task' in step 'think'"),
    ),
    "reference not needed": (
        BAD / "bad_reference.yaml",
        _literal("steps[2].with.x: step 'c' references 'a' but does not (transitively) need it"),
    ),
    "wrong types": (
        BAD / "wrong_types.yaml",
        _literal(
            "steps[1].needs: Input should be a valid list",
            "steps[2].timeout_s: Input should be greater than 0",
            "steps[3].retry.attempts: Input should be a valid integer",
            "policy.max_parallel: Input should be a valid integer",
        ),
    ),
    "yaml syntax": (
        BAD / "syntax_error.yaml",
        _literal("not valid YAML: mapping values are not allowed here", "line 5"),
    ),
    "missing file": (BAD / "no_such_plan.yaml", _literal("no such file")),
}


@pytest.fixture(scope="module")
def bad_plan_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Result, Result]]:
    """For each bad plan: the db path given, `baton run` and `baton validate --json` results."""
    root = tmp_path_factory.mktemp("bad")
    dbs = {name: root / name.replace(" ", "_") / "baton.db" for name in BAD_PLANS}
    commands: list[list[str | Path]] = []
    for name, (plan, _) in BAD_PLANS.items():
        commands.append(["run", plan, "--db", dbs[name]])
        commands.append(["validate", plan, "--json", "--db", dbs[name]])
    results = _run_all(commands)
    return {name: (dbs[name], results[2 * i], results[2 * i + 1]) for i, name in enumerate(BAD_PLANS)}


@pytest.mark.parametrize("kind", list(BAD_PLANS))
def test_bad_plan_exits_2_names_every_problem_and_creates_no_database(
    kind: str, bad_plan_results: dict[str, tuple[Path, Result, Result]]
) -> None:
    _, expected = BAD_PLANS[kind]
    db, run, validate = bad_plan_results[kind]
    assert run.code == 2
    assert run.out == ""
    assert run.err.startswith("error: invalid plan")
    for pattern in expected:
        assert re.search(pattern, run.err), pattern
    assert "Traceback" not in run.err
    assert not db.parent.exists(), "a bad plan must not create the database"

    assert validate.code == 2
    error = validate.json()["error"]
    assert error["code"] == "invalid_plan"
    listed = "\n".join(
        f"{p['where']}: {p['message']}" if p["where"] else p["message"] for p in error["problems"]
    )
    for pattern in expected:
        assert re.search(pattern, listed), pattern


def test_unknown_runs_bad_urls_and_usage_errors_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    baton("run", PLANS / "diamond.yaml", "--db", db, "--quiet")
    missing_db = tmp_path / "missing" / "b.db"
    show, cancel_json, resume_no_db, bad_url, bad_url_json, no_plan, no_command = _run_all(
        [
            ["show", "ffff", "--db", db],
            ["cancel", "nope", "--db", db, "--json"],
            ["resume", "0123", "--db", missing_db],
            ["runs", "--db", "mongodb://somewhere/db"],
            ["validate", PLANS / "diamond.yaml", "--db", "mysql://x", "--json"],
            ["run"],
            ["frobnicate"],
        ]
    )
    assert (show.code, show.err.strip()) == (2, "error: no run 'ffff'")
    assert cancel_json.code == 2
    assert cancel_json.json() == {"error": {"code": "not_found", "message": "no run 'nope'"}}
    assert resume_no_db.code == 2 and "no database at" in resume_no_db.err
    assert not missing_db.parent.exists()
    assert bad_url.code == 2
    assert "unsupported database URL scheme 'mongodb'" in bad_url.err
    assert bad_url_json.code == 2 and bad_url_json.json()["error"]["code"] == "usage"
    assert no_plan.code == 2 and "Missing argument 'PLAN'" in no_plan.err
    assert no_command.code == 2 and "No such command 'frobnicate'" in no_command.err
    for result in (show, cancel_json, resume_no_db, bad_url, bad_url_json, no_plan, no_command):
        assert "Traceback" not in result.err


# -- pause, resume, cancel, interrupt --------------------------------------------------------------


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A working directory for gated.yaml and a database; the gate is opened at the end."""
    yield tmp_path, tmp_path / "b.db"
    (tmp_path / "gate.open").touch()


def test_pause_lets_the_running_step_finish_then_resume_completes(gated: tuple[Path, Path]) -> None:
    cwd, db = gated
    proc, run_id = _start("run", PLANS / "gated.yaml", "--db", db, cwd=cwd)
    _wait_for(cwd / "gate.started", proc)

    busy = baton("resume", run_id, "--db", db)
    assert busy.code == 2
    assert f"is being executed by {os.uname().nodename}:{proc.pid}:" in busy.err

    paused = baton("pause", run_id[:16], "--db", db)
    assert paused.code == 0
    assert f"run {run_id} (gated): paused" in paused.out
    time.sleep(0.5)  # the run notices the pause within a heartbeat (0.2s)...
    assert proc.poll() is None, "the running step must be allowed to finish"
    (cwd / "gate.open").touch()  # ...and stops once the gate step finished
    ran = _finish(proc)
    assert ran.code == 3, ran.err
    assert "(gated): paused" in ran.out
    assert "2 succeeded, 0 failed, 0 skipped, 1 pending, 1 ready" in ran.out  # ready: marked by the finish
    assert f"continue with: baton resume {run_id} --db {db}" in ran.out

    resumed = baton("resume", run_id, "--db", db, "--json", cwd=cwd)
    assert resumed.code == 0, resumed.err
    doc = resumed.json()
    assert doc["status"] == "completed"
    assert set(_statuses(doc).values()) == {"succeeded"}
    assert all(s["attempts"] == 1 for s in doc["steps"]), "nothing ran twice"
    assert doc["steps"][3]["output"] == {"gate": "opened\n"}


def test_cancel_stops_the_run_and_its_running_step(gated: tuple[Path, Path]) -> None:
    cwd, db = gated
    proc, run_id = _start("run", PLANS / "gated.yaml", "--db", db, cwd=cwd)
    _wait_for(cwd / "gate.started", proc)

    cancelled = baton("cancel", run_id, "--db", db, "--json")
    assert cancelled.code == 0
    assert cancelled.json()["status"] == "cancelled"
    ran = _finish(proc)  # the gate never opens: the run must stop it
    assert ran.code == 1
    assert "(gated): cancelled" in ran.out
    assert "1 succeeded, 0 failed, 0 skipped, 3 cancelled" in ran.out

    shown = baton("show", run_id, "--db", db, "--json").json()
    assert shown["status"] == "cancelled"
    assert _statuses(shown) == {
        "first": "succeeded",
        "gate": "cancelled",
        "after": "cancelled",
        "last": "cancelled",
    }


def test_ctrl_c_releases_the_run_and_resume_finishes_it(gated: tuple[Path, Path]) -> None:
    cwd, db = gated
    proc, run_id = _start("run", PLANS / "gated.yaml", "--db", db, cwd=cwd)
    _wait_for(cwd / "gate.started", proc)
    proc.send_signal(signal.SIGINT)
    ran = _finish(proc)
    assert ran.code == 130
    assert f"run {run_id} stopped in this process and can continue with: baton resume {run_id}" in ran.err
    assert "Traceback" not in ran.err

    (cwd / "gate.open").touch()
    # No waiting for a lease to lapse: Ctrl-C released it.
    resumed = baton("resume", run_id, "--db", db, cwd=cwd)
    assert resumed.code == 0, resumed.err
    assert f"run {run_id} resumed: gated, 4 steps (1 already succeeded)" in resumed.out
    assert "4 succeeded, 0 failed, 0 skipped (4 total)" in resumed.out


def test_a_later_run_recovers_a_run_whose_process_died(gated: tuple[Path, Path]) -> None:
    cwd, db = gated
    proc, orphan = _start("run", PLANS / "gated.yaml", "--db", db, cwd=cwd)
    _wait_for(cwd / "gate.started", proc)
    proc.kill()  # kill -9: no chance to release anything
    proc.communicate(timeout=TIMEOUT_S)
    (cwd / "gate.open").touch()

    result = baton("run", PLANS / "diamond.yaml", "--db", db, cwd=cwd)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"recovered run {orphan} (gated): its process stopped; continuing it here"
    assert f"recovered run {orphan} (gated): completed" in lines
    assert re.search(r"run [0-9a-f]{20} \(diamond\): completed", result.out)
    assert [r["status"] for r in baton("runs", "--db", db, "--json").json()["runs"]] == ["completed"] * 2
