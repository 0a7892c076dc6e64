"""Structured logs: JSON lines off a terminal, each saying which run, step and attempt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TASKS = """
import structlog
import baton

log = structlog.get_logger("shop")


@baton.task
async def charge(amount: int) -> dict:
    log.info("charging card", amount=amount)
    return {"charged": amount}
"""


def test_a_tasks_log_lines_carry_run_step_and_attempt(tmp_path: Path) -> None:
    (tmp_path / "shop_tasks.py").write_text(TASKS)
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: shop\nsteps:\n  - {id: pay, task: shop_tasks.charge, with: {amount: 12}}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton",
            "run",
            str(plan),
            "--db",
            str(tmp_path / "l.db"),
            "--import",
            "shop_tasks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    charging = [line for line in lines if line.get("event") == "charging card"]
    assert len(charging) == 1
    entry = charging[0]
    assert (entry["step_id"], entry["attempt"], entry["amount"], entry["level"]) == ("pay", 1, 12, "info")
    assert len(entry["run_id"]) >= 10 and entry["timestamp"].endswith("Z")
