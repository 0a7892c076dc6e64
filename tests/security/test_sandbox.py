"""The sandbox: what the programs of an API caller's steps can and cannot touch.

Against a real `baton serve` (as root, as a container runs it, its steps run as nobody):
each escape a step might try (the server's directory, its database, its environment,
absolute and ``../`` paths, symlinks) is refused by the operating system or by baton;
programs a role was not granted are refused before the run is written, or when a
reference names them; resource abuse is stopped by baton's own limits. Every abuse here
is bounded by the test itself (a loop of 100, an allocation of 3 GiB, a file of 64 MiB),
so a limit that failed would not put the host at risk.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import Engine
from baton.sandbox import Sandbox
from tests.test_api import Server, keyed_server, wait_run

ROOT = os.geteuid() == 0
POLICY = """
roles:
  tester:
    capabilities: [pure, llm, http, shell]
    limits: {cpu_s: 30, memory_mb: 2048, processes: 512, file_mb: 64, open_files: 256}
  coder:
    capabilities: [pure, llm, http, shell]
    programs: [sh, cat, ls, ln, id, pwd, touch, python3, "true", sleep]
"""


def plan(*steps: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


def sh(step_id: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "task": "shell", "role": "coder", "with": {"argv": ["sh", "-c", script], **extra}}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("sandbox")
    db = home / "baton.db"
    (home / "policy.yaml").write_text(POLICY)
    (home / "server-secret.txt").write_text("the server's own file\n")
    (home / "server-secret.txt").chmod(0o600)
    with keyed_server(
        db, ("operator",), "--policy", str(home / "policy.yaml"), "--workspaces", str(home / "ws")
    ) as server:
        yield server


def run(api: Server, *steps: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run a plan as the operator; its steps by id (status, output, error)."""
    client = api.client("operator")
    made = client.post("/runs", json=plan(*steps))
    assert made.status_code == 202, made.text
    detail = wait_run(client, made.json()["id"])
    return {s["id"]: s for s in detail["steps"]}


def out(step: dict[str, Any]) -> str:
    assert step["status"] == "succeeded", step
    return str(step["output"]["stdout"]) + str(step["output"]["stderr"])


def test_a_step_runs_in_a_workspace_of_its_run_as_nobody(api: Server) -> None:
    home = api.db.parent
    steps = run(api, sh("where", "pwd; id -u; touch made-here; ls"))
    where, uid = out(steps["where"]).split()[:2]
    assert Path(where).parent == home / "ws"  # ws/RUN_ID, not the server's directory
    assert (Path(where) / "made-here").exists()
    if ROOT:
        assert uid == str(pwd.getpwnam("nobody").pw_uid)


@pytest.mark.skipif(not ROOT, reason="steps run as another user only when the server is root")
def test_the_servers_database_environment_and_files_are_out_of_reach(api: Server) -> None:
    home = api.db.parent
    pid = api.pid
    steps = run(
        api,
        sh("db", f"cat {api.db} > /dev/null", check=False),
        sh("environ", f"cat /proc/{pid}/environ", check=False),
        sh("parent", "cat /proc/$PPID/environ", check=False),
        sh("file", f"cat {home}/server-secret.txt", check=False),
        sh("write", f"touch {home}/owned", check=False),
        sh("link", f"ln -s {api.db} db-link && cat db-link > /dev/null", check=False),
        sh(
            "keys",
            f"python3 -c \"import sqlite3; sqlite3.connect('{api.db}').execute('DELETE FROM api_keys')\"",
            check=False,
        ),
    )
    for name in ("db", "environ", "parent", "file", "write", "link", "keys"):
        step = steps[name]
        assert step["status"] == "succeeded" and step["output"]["returncode"] != 0, (name, step)
    assert "Permission denied" in out(steps["db"]) and "Permission denied" in out(steps["environ"])
    # nor the supervisor's between the server and the program (which is empty anyway)
    assert "Permission denied" in out(steps["parent"])
    assert not (home / "owned").exists()
    with sqlite3.connect(api.db) as con:
        assert con.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 1


def test_paths_out_of_the_workspace_are_refused(api: Server) -> None:
    steps = run(
        api,
        sh("up", "pwd", cwd=".."),
        sh("abs", "pwd", cwd="/etc"),
        sh("mklink", "ln -s / out"),
        {**sh("via", "pwd", cwd="out"), "needs": ["mklink"]},
    )
    for name in ("up", "abs", "via"):
        assert steps[name]["status"] == "failed"
        assert "leaves the working directory" in steps[name]["error"], steps[name]


def test_programs_a_role_was_not_given_are_refused(api: Server) -> None:
    client = api.client("operator")
    # tester has shell without a list of programs: anything but shells and interpreters
    for argv in (["sh", "-c", "id"], ["python3.11", "-c", "1"], ["/usr/bin/id"], ["env", "sh"]):
        refused = client.post(
            "/runs", json=plan({"id": "t", "task": "shell", "role": "tester", "with": {"argv": argv}})
        )
        assert refused.status_code == 403, (argv, refused.text)
        assert refused.json()["problems"][0]["where"] == "steps[0]"
    # coder's list does not have rm
    refused = client.post(
        "/runs", json=plan({"id": "rm", "task": "shell", "role": "coder", "with": {"argv": ["rm", "x"]}})
    )
    assert refused.status_code == 403 and "not among the programs" in refused.text
    # a program named by a reference is checked when the step starts
    steps = run(
        api,
        {"id": "name", "task": "echo", "role": "tester", "with": {"program": "bash"}},
        {
            "id": "t",
            "task": "shell",
            "role": "tester",
            "needs": ["name"],
            "with": {"argv": ["${{ steps.name.output.program }}", "-c", "id"]},
        },
    )
    assert steps["t"]["status"] == "failed" and "'bash' runs whatever it is given" in steps["t"]["error"]
    # so is the command validator's program
    check = {
        "id": "v",
        "task": "echo",
        "role": "coder",
        "validate": [{"kind": "command", "argv": ["rm", "-rf", "."]}],
    }
    assert client.post("/runs", json=plan(check)).status_code == 403


def test_the_command_validators_file_name_stays_in_its_directory(api: Server) -> None:
    client = api.client("operator")
    for name in ("../escaped.txt", "/tmp/escaped.txt", "a/b"):
        step = {"id": "v", "task": "echo", "role": "coder", "with": {"x": 1}}
        step["validate"] = [{"kind": "command", "argv": ["cat", "{file}"], "filename": name}]
        refused = client.post("/runs", json=plan(step))
        assert refused.status_code == 422 and "plain file name" in refused.text, refused.text
    checked = {"id": "v", "task": "echo", "role": "coder", "with": {"x": 1}}
    checked["validate"] = [{"kind": "command", "argv": ["cat", "{file}"], "filename": "out.json"}]
    assert run(api, checked)["v"]["status"] == "succeeded"


def test_resource_abuse_is_stopped_by_the_steps_limits(api: Server) -> None:
    def tester(step_id: str, argv: list[str], limits: dict[str, int]) -> dict[str, Any]:
        return {"id": step_id, "task": "shell", "role": "tester", "with": {"argv": argv, "limits": limits}}

    steps = run(
        api,
        tester("file", ["dd", "if=/dev/zero", "of=big", "bs=1M", "count=64"], {"file_mb": 8}),
        tester("cpu", ["sha256sum", "/dev/zero"], {"cpu_s": 1}),
    )
    assert steps["file"]["status"] == "failed" and "past its limit (8 MiB" in steps["file"]["error"]
    assert steps["cpu"]["status"] == "failed" and "CPU limit (1 s" in steps["cpu"]["error"]
    # above the role's maximum: refused before anything runs
    too_much = api.client("operator").post("/runs", json=plan(tester("cpu", ["sha256sum"], {"cpu_s": 31})))
    assert too_much.status_code == 403 and "above the role's maximum, 30" in too_much.text
    # by a role whose policy lists python3 (coder): memory, processes, open files
    allocate = "x = bytearray(3 << 30)"  # 3 GiB
    forks = "import os\nfor _ in range(100):\n    os.fork() or os.execv('/bin/sleep', ['sleep', '5'])"
    opens = "files = [open('/dev/null') for _ in range(100)]"

    def coder(step_id: str, code: str, limits: dict[str, int]) -> dict[str, Any]:
        argv = ["python3", "-c", code]
        return {"id": step_id, "task": "shell", "role": "coder", "with": {"argv": argv, "limits": limits}}

    steps = run(
        api,
        coder("mem", allocate, {"memory_mb": 256}),
        coder("procs", forks, {"processes": 20}),
        coder("files", opens, {"open_files": 20}),
    )
    assert steps["mem"]["status"] == "failed" and "MemoryError" in steps["mem"]["error"]
    if ROOT:  # the limit counts the processes of the user: nobody's, when the server is root
        assert steps["procs"]["status"] == "failed" and "BlockingIOError" in steps["procs"]["error"]
    assert steps["files"]["status"] == "failed" and "Too many open files" in steps["files"]["error"]


async def test_a_confined_step_without_a_timeout_gets_the_default(tmp_path: Path) -> None:
    sandbox = Sandbox.of(tmp_path / "ws", timeout_s=1.0)
    async with Engine(str(tmp_path / "b.db"), workdir=tmp_path, sandbox=sandbox) as engine:
        step = {"id": "s", "task": "shell", "with": {"argv": ["sleep", "30"]}}
        record = await engine.run({"name": "p", "policy": {"sandbox": True}, "steps": [step]})
        (done,) = await engine.store.get_steps(record.id)
    assert record.status == "failed" and "timed out after 1.0s" in (done.error or "")


async def test_a_steps_time_limit_holds_its_validators(tmp_path: Path) -> None:
    slow = {"kind": "command", "argv": ["sleep", "30"]}
    async with Engine(str(tmp_path / "b.db"), workdir=tmp_path) as engine:
        step = {"id": "s", "task": "echo", "with": {"x": 1}, "timeout_s": 1, "validate": [slow]}
        record = await engine.run({"name": "p", "steps": [step]})
        (done,) = await engine.store.get_steps(record.id)
    assert record.status == "failed" and "timed out after 1" in (done.error or ""), done.error


def test_a_key_holders_job_runs_confined_too(api: Server) -> None:
    client = api.client("operator")
    # the job runs under coder, the first role of the key that may run shell: not bash
    refused = client.post("/jobs", json={"task": "shell", "input": {"argv": ["bash", "-c", "id"]}})
    assert refused.status_code == 403 and "'bash' is not among the programs" in refused.text
    made = client.post("/jobs", json={"task": "shell", "input": {"argv": ["pwd"]}})
    assert made.status_code == 202, made.text
    job_id = made.json()["id"]
    deadline = time.monotonic() + 30
    while (job := client.get(f"/jobs/{job_id}").json())["state"] not in ("completed", "discarded"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "completed", job
    assert job["output"]["stdout"].strip() == str(api.db.parent / "ws" / f"job-{job_id}")


async def test_pruning_a_run_removes_its_workspace_and_no_other(tmp_path: Path) -> None:
    sandbox = Sandbox.of(tmp_path / "ws")
    async with Engine(str(tmp_path / "b.db"), workdir=tmp_path, sandbox=sandbox) as engine:
        step = {"id": "s", "task": "shell", "with": {"argv": ["touch", "made"]}}
        done = await engine.run({"name": "p", "policy": {"sandbox": True}, "steps": [step]})
        kept = await engine.submit({"name": "q", "policy": {"sandbox": True}, "steps": [step]}, start=False)
        (tmp_path / "ws" / kept.run_id).mkdir()  # a run not ended yet: its workspace stays
        assert (tmp_path / "ws" / done.id / "made").exists()
        pruned = await engine.prune(time.time() + 3600)
    assert pruned.runs == 1
    assert not (tmp_path / "ws" / done.id).exists() and (tmp_path / "ws" / kept.run_id).exists()
