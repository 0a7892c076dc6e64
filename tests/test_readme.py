"""The README's examples run as written (executable docs)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from baton.policy import Policy

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_plan_runs_to_completion(tmp_path: Path) -> None:
    (plan,) = _blocks("yaml")
    (tmp_path / "plan.yaml").write_text(plan)
    done = subprocess.run(
        [sys.executable, "-m", "baton", "run", "plan.yaml", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    report = next(s for s in result["steps"] if s["id"] == "report")
    assert report["output"] == {"built": "built\n"}
    assert (tmp_path / ".baton" / "baton.db").exists(), "the default database location"


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    (example,) = _blocks("python")
    (tmp_path / "hello.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "hello.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "completed"


def test_the_readmes_policy_example_is_a_policy_that_confines() -> None:
    (example,) = [b for b in _blocks("text") if b.lstrip().startswith("roles:")]
    policy = Policy.of(yaml.safe_load(example), "README")
    assert "shell" in policy.roles["tester"] and policy.programs["tester"] == ("pytest", "make", "git")
    assert policy.maxima["tester"]["cpu_s"] == 1800


def test_the_readme_goal_runs_as_written(tmp_path: Path) -> None:
    """The Goals section's command, from the repository (its LLM config is examples/)."""
    (command,) = _blocks("shell")
    args = shlex.split(command.strip())
    assert args[:2] == ["baton", "goal"]
    done = subprocess.run(
        [sys.executable, "-m", "baton", *args[1:], "--db", str(tmp_path / "g.db"), "--json"],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["task_type"]) == ("completed", "nats_consumer")
    assert "defmodule UserEvents.Consumer" in result["result"]
