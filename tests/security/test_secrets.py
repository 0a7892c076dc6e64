"""The server's secrets never reach what it stores or logs: a step that reads them (from
the environment, or an error that quotes one) leaves ``[redacted:NAME]`` where they were,
in its output, its error and its details, and in the worker's log lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baton import Engine
from baton.secrets import Redactor

SECRET = "sk-test-0123456789abcdef"
TASKS = """
import os
import baton

@baton.task(name="leak.env")
def env() -> dict:
    return {"key": os.environ["OPENAI_API_KEY"], "quoted": 'a "' + os.environ["DB_PASSWORD"] + '"'}

@baton.task(name="leak.error")
def error() -> None:
    raise RuntimeError("GET https://api.example/?token=" + os.environ["SERVICE_TOKEN"] + " failed")
"""


def test_the_redactor_replaces_values_of_secret_names_and_leaves_the_rest() -> None:
    redactor = Redactor.from_environ(
        {"OPENAI_API_KEY": SECRET, "DB_PASSWORD": 'p"ss\\word!', "HOME": "/root/home-dir", "X_TOKEN": "short"}
    )
    assert (
        redactor.redact(f"key={SECRET} home=/root/home-dir")
        == "key=[redacted:OPENAI_API_KEY] home=/root/home-dir"
    )
    as_json = json.dumps({"p": 'p"ss\\word!'})
    assert json.loads(redactor.redact(as_json)) == {"p": "[redacted:DB_PASSWORD]"}
    assert redactor.redact("short") == "short"  # too short to be a secret worth the name
    assert not Redactor.from_environ({"HOME": "/root"})


def test_steps_cannot_carry_the_servers_secrets_into_the_store_or_the_logs(tmp_path: Path) -> None:
    (tmp_path / "leaky.py").write_text(TASKS)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "OPENAI_API_KEY": SECRET,
        "DB_PASSWORD": "hunter2-but-longer",
        "SERVICE_TOKEN": "tok-abcdefgh12345",
    }
    plan = tmp_path / "plan.json"
    steps = [{"id": "env", "task": "leak.env"}, {"id": "err", "task": "leak.error"}]
    plan.write_text(json.dumps({"name": "leaky", "steps": steps}))
    db = tmp_path / "baton.db"
    ran = subprocess.run(
        [sys.executable, "-m", "baton", "run", str(plan), "--db", str(db), "--import", "leaky", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 1, ran.stderr  # the error step fails
    everything = ran.stdout + ran.stderr + db.read_bytes().decode("utf-8", "replace")
    for wal in tmp_path.glob("baton.db-wal"):
        everything += wal.read_bytes().decode("utf-8", "replace")
    for value in (SECRET, "hunter2-but-longer", "tok-abcdefgh12345"):
        assert value not in everything
    steps_out = {s["id"]: s for s in json.loads(ran.stdout)["steps"]}
    assert steps_out["env"]["output"] == {
        "key": "[redacted:OPENAI_API_KEY]",
        "quoted": 'a "[redacted:DB_PASSWORD]"',
    }
    assert "token=[redacted:SERVICE_TOKEN] failed" in steps_out["err"]["error"]


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "MY_SECRET"])
async def test_an_engine_reads_its_secrets_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, SECRET)
    async with Engine(str(tmp_path / "b.db"), workdir=tmp_path) as engine:
        assert await engine.execute("echo", {"said": f"the key is {SECRET}"}) == {
            "said": f"the key is [redacted:{name}]"
        }
