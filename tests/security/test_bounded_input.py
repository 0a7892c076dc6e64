"""Bounded input: what users give (plan files and text, HTTP bodies, schedule files, LLM
configs) is refused at once and clearly when reading it would cost far more than its size
(aliases, duplicate keys, deep nesting, huge integers, NUL characters, too many steps, too
large a body); reference checks stay near-linear; cron expressions that never fire are
refused; a bad schedule entry does not stop the others. The server goes on answering.

Times are generous bounds, to catch minutes, not to measure: the refusals take milliseconds.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton import Engine, Registry
from baton.errors import PlanError, UsageError

BATON = [sys.executable, "-m", "baton"]
QUICK_S = 10.0  # a generous bound for what takes milliseconds

# A "billion laughs": 9 levels of 9 aliases, 9**9 (387 million) strings once walked, in
# about 600 bytes. Before aliases were refused it kept `baton run` busy for minutes.
LEVELS = [
    "      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
    *(f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)),
]
BOMB = "name: laughs\nsteps:\n  - id: s\n    task: echo\n    with:\n" + "\n".join(LEVELS) + "\n"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "BATON_DB"}


def baton(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BATON, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def refusal(text: str) -> str:
    """The one problem reading plan ``text`` reports (PlanError required)."""
    from baton.plan.validate import read_plan_text

    with pytest.raises(PlanError) as info:
        read_plan_text(text)
    [problem] = info.value.problems
    return problem.message


# -- the reader ---------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_its_first_alias() -> None:
    assert len(BOMB) < 700
    started = time.monotonic()
    message = refusal(BOMB)
    assert time.monotonic() - started < QUICK_S
    assert "YAML aliases are not allowed" in message and "*a0, line 7" in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # duplicate keys: the later one would silently win
        ("name: a\nsteps: []\nname: b\n", ["duplicate key 'name'", "line 3", "first at line 1"]),
        ("name: p\nsteps:\n  - {id: a, task: echo, id: b}\n", ["duplicate key 'id'", "line 3"]),
        ('{"name": "a", "steps": [], "name": "b"}', ["duplicate key 'name'"]),
        # nesting: PyYAML and json recurse, and so does everything that walks the data
        ("name: p\nsteps: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 64 levels", "line 2"]),
        ('{"name": "p", "steps": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested deeper than 64"]),
        ('{"name": "p", "steps": ' + "[" * 65 + "]" * 65 + "}", ["nested deeper than 64"]),
        # integers: Python's have no bound; the stores' and JSON readers' do
        ("name: p\nn: 1" + "0" * 5000 + "\n", ["integer of 5001 characters", "line 2"]),
        (f"name: p\nn: {2**63}\n", [f"integer {2**63} is out of range"]),
        (f"name: p\nn: {-(2**63) - 1}\n", ["out of range"]),
        ("name: p\nn: 0x1" + "0" * 16 + "\n", ["out of range"]),
        ('{"name": "p", "n": 1' + "0" * 5000 + "}", ["integer of 5001 digits"]),
        (f'{{"name": "p", "n": {2**64}}}', ["out of range"]),
        # NUL characters: PostgreSQL cannot store them
        ('name: "p\\0"\nsteps: []\n', ["NUL characters are not allowed", "line 1"]),
        ("name: p\nsteps: []\n# \x00\n", ["NUL characters are not allowed", "line 3"]),
        ('{"name": "p\\u0000", "steps": []}', ["NUL characters are not allowed"]),
        ('{"name": "p", "steps": [], "x": {"k\\u0000": 1}}', ["NUL characters are not allowed"]),
    ],
)
def test_what_the_reader_refuses_is_named_with_its_line(text: str, fragments: list[str]) -> None:
    started = time.monotonic()
    message = refusal(text)
    assert time.monotonic() - started < QUICK_S
    assert all(f in message for f in fragments), message


def test_the_bounds_lie_where_they_say_and_what_is_within_them_reads_as_before() -> None:
    from baton.plan.validate import read_plan_text

    edge = read_plan_text(f"name: p\nbig: {2**63 - 1}\nsmall: {-(2**63)}\nhex: 0x7fffffffffffffff\n")
    assert edge == {"name": "p", "big": 2**63 - 1, "small": -(2**63), "hex": 2**63 - 1}
    assert "out of range" in refusal(f"name: p\nbig: {2**63}\n")
    deep = "[" * 63 + "]" * 63
    assert read_plan_text(f"name: p\nx: {deep}\n")["name"] == "p"  # 64 levels, the document's included
    assert "nested deeper than 64 levels" in refusal(f"name: p\nx: [{deep}]\n")
    assert read_plan_text(f'{{"name": "p", "x": {deep}}}')["name"] == "p"
    assert "nested deeper than 64 levels" in refusal(f'{{"name": "p", "x": [{deep}]}}')
    # an escaped backslash before u0000 is no NUL; an anchor alone is harmless, its alias is not
    assert read_plan_text('{"a": "\\\\u0000 is not NUL"}') == {"a": "\\u0000 is not NUL"}
    assert read_plan_text("a: &x 1\nb: 2\n") == {"a": 1, "b": 2}
    assert "YAML aliases are not allowed (*x, line 2)" in refusal("a: &x 1\nb: *x\n")
    # a merge key with the mapping written out is no alias
    merged = read_plan_text("base: {a: 1}\nmerged:\n  <<: {a: 2}\n  b: 3\n")
    assert merged["merged"] == {"a": 2, "b": 3}


def test_a_file_past_the_size_limit_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    from baton.plan.reader import Refused, read_text

    path = tmp_path / "big.yaml"
    path.write_text("name: p\n" + "#" * 1000 + "\n")
    with pytest.raises(Refused, match="more than 100 bytes"):
        read_text(path, limit=100)
    assert read_text(path, limit=2000).startswith("name: p")


# -- plan size and reference checks -------------------------------------------------------


def _steps(n: int) -> list[dict[str, Any]]:
    return [{"id": f"s{i}", "task": "echo"} for i in range(n)]


async def test_a_plan_past_max_plan_steps_is_refused_before_any_step_is_read() -> None:
    async with Engine("memory://", max_plan_steps=10) as engine:
        assert len(engine.load({"name": "ten", "steps": _steps(10)}).steps) == 10
        with pytest.raises(PlanError) as info:
            engine.load({"name": "eleven", "steps": [*_steps(10), {"id": "bad", "task": 1}]})
        assert [str(p) for p in info.value.problems] == [
            "steps: 11 steps; a plan may have at most 10 (max_plan_steps)"
        ]
    from baton.plan.validate import MAX_PLAN_STEPS

    async with Engine("memory://") as engine:
        assert engine.max_plan_steps == MAX_PLAN_STEPS >= 100_000  # bench/engine.py's largest plan
        started = time.monotonic()
        with pytest.raises(PlanError, match="at most"):
            engine.load({"name": "huge", "steps": _steps(MAX_PLAN_STEPS + 1)})
        assert time.monotonic() - started < QUICK_S


def _ref(step: str) -> str:
    return f"${{{{ steps.{step}.output.x }}}}"


def _validate(plan: dict[str, Any]) -> tuple[float, list[str]]:
    from baton.plan import parse_plan

    started = time.monotonic()
    try:
        parse_plan(plan, Registry.default())
        problems: list[str] = []
    except PlanError as exc:
        problems = [str(p) for p in exc.problems]
    return time.monotonic() - started, problems


N = 24_000


def test_a_long_chain_referencing_its_first_step_validates_quickly() -> None:
    # Each step needs the one before and references the first: a walk per reference up
    # the whole chain made this quadratic (21 s); ancestors are now found in one pass.
    steps = [{"id": "s0", "task": "echo", "with": {"x": 1}}]
    steps += [
        {
            "id": f"s{i}",
            "task": "echo",
            "needs": [f"s{i - 1}"],
            "with": {"x": _ref("s0"), "y": _ref(f"s{i - 1}")},
        }
        for i in range(1, N)
    ]
    elapsed, problems = _validate({"name": "chain", "steps": steps})
    assert problems == [] and elapsed < QUICK_S
    # the last step but one references the last: not a need of it, and said so
    steps[N - 2] = {**steps[N - 2], "with": {"x": _ref(f"s{N - 1}")}}
    elapsed, problems = _validate({"name": "chain", "steps": steps})
    assert problems == [
        f"steps[{N - 2}].with.x: step 's{N - 2}' references 's{N - 1}' but does not (transitively) need it"
    ]
    assert elapsed < QUICK_S


def test_a_wide_fan_in_referencing_every_branch_validates_quickly() -> None:
    branches = [{"id": f"b{i}", "task": "echo", "needs": ["root"], "with": {"x": 1}} for i in range(N)]
    sink = {"id": "sink", "task": "echo", "needs": [f"b{i}" for i in range(N)]}
    sink["with"] = {f"k{i}": _ref(f"b{i}") for i in range(N)}
    collector = {
        "id": "all",
        "task": "echo",
        "needs": ["sink"],
        "with": {"k": [_ref(f"b{i}") for i in range(N)]},
    }
    plan = {"name": "fan-in", "steps": [{"id": "root", "task": "echo"}, *branches, sink, collector]}
    elapsed, problems = _validate(plan)
    assert problems == [] and elapsed < QUICK_S
    loner = {"id": "loner", "task": "echo", "with": {"x": _ref("b7")}}
    elapsed, problems = _validate({**plan, "steps": [*plan["steps"], loner]})
    assert problems == [
        f"steps[{N + 3}].with.x: step 'loner' references 'b7' but does not (transitively) need it"
    ]
    assert elapsed < QUICK_S


def test_reference_checks_stay_exact_and_quick_on_a_plan_with_a_cycle() -> None:
    steps = [{"id": "s0", "task": "echo", "needs": ["s1"]}]
    steps += [
        {"id": f"s{i}", "task": "echo", "needs": [f"s{i - 1}"], "with": {"x": _ref("s0")}}
        for i in range(1, N)
    ]
    steps.append({"id": "out", "task": "echo", "with": {"x": _ref("s5")}})
    elapsed, problems = _validate({"name": "cyclic", "steps": steps})
    assert elapsed < QUICK_S
    assert problems[0] in ("steps: cycle: s0 -> s1 -> s0", "steps: cycle: s1 -> s0 -> s1")
    assert problems[1:] == [
        f"steps[{N}].with.x: step 'out' references 's5' but does not (transitively) need it"
    ]


def test_a_long_unclosed_reference_is_read_in_linear_time() -> None:
    # `${{` and spaces with no `}}`: the regular expression that found references took
    # cubic time on it (30 s for 4,000 spaces), and quadratic on many `${{`.
    plan = {"name": "p", "steps": [{"id": "a", "task": "echo", "with": {"x": "${{" + " " * 4_000}}]}
    elapsed, problems = _validate(plan)
    assert problems == [] and elapsed < QUICK_S
    opened = {"name": "p", "steps": [{"id": "a", "task": "echo", "with": {"x": "${{" * 30_000}}]}
    elapsed, problems = _validate(opened)
    assert problems == [] and elapsed < QUICK_S


# -- cron -----------------------------------------------------------------------------------


async def test_a_cron_expression_that_never_fires_is_refused() -> None:
    async with Engine("memory://") as engine:
        for expr in ("0 0 30 2 *", "0 0 31 4,6,9,11 *"):
            with pytest.raises(UsageError, match=r"never fires"):
                await engine.schedule("echo", cron=expr)
        assert await engine.store.list_schedules() == []
        await engine.schedule("echo", cron="0 0 29 2 *", name="leap")  # rare, but it fires
        assert [s.name for s in await engine.store.list_schedules()] == ["leap"]


def test_the_cli_refuses_a_cron_expression_that_never_fires(tmp_path: Path) -> None:
    done = baton("schedules", "add", "x", "--task", "echo", "--cron", "0 0 30 2 *", "--db", tmp_path / "q.db")
    assert done.returncode == 2, done.stderr
    assert "cron expression '0 0 30 2 *' never fires" in done.stderr and "Traceback" not in done.stderr


SCHEDULES = """\
- {name: one, task: echo, cron: '*/5 * * * *'}
- {name: feb30, task: echo, cron: '0 0 30 2 *'}
- {name: typo, task: echo, cron: '* * * * *', evry: 5}
- {name: two, task: echo, cron: '0 3 * * *'}
- {name: one, task: echo, cron: '0 4 * * *'}
"""


async def test_a_bad_schedule_entry_is_skipped_and_the_others_declared(tmp_path: Path) -> None:
    from baton.cli.queue import load_schedules

    path = tmp_path / "schedules.yaml"
    path.write_text(SCHEDULES)
    async with Engine(str(tmp_path / "q.db")) as engine:
        declared = await load_schedules(engine, path)
        assert [s.name for s in declared] == ["one", "two"]
        assert sorted(s.name for s in await engine.store.list_schedules()) == ["one", "two"]
        assert next(s for s in await engine.store.list_schedules() if s.name == "one").cron == "*/5 * * * *"
        # the reader's bounds hold for schedule files too
        path.write_text("- {task: echo, cron: &c '* * * * *'}\n- {task: echo, cron: *c, name: b}\n")
        with pytest.raises(UsageError, match=r"YAML aliases are not allowed \(\*c, line 2\)"):
            await load_schedules(engine, path)


def test_the_worker_logs_a_bad_schedule_entry_with_its_line_and_runs_the_others(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(SCHEDULES)
    proc = subprocess.Popen(
        [*BATON, "worker", "--schedules", str(path), "--db", str(tmp_path / "q.db"), "--json"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline() or "{}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert started.get("event") == "started", err
    assert started["schedules"] == ["one", "two"]
    skipped = [json.loads(line) for line in err.splitlines() if "schedule skipped" in line]
    problems = [entry["problem"] for entry in skipped]
    assert len(problems) == 3, err
    assert "line 2: schedule 2 cannot be declared: cron expression '0 0 30 2 *' never fires" in problems[0]
    assert "line 3: schedule 3 has unknown field(s) ['evry']" in problems[1]
    assert "line 5: schedule 5 is named 'one', as the schedule on line 1 is" in problems[2]


# -- LLM configs ------------------------------------------------------------------------------


def test_an_llm_config_goes_through_the_same_reader(tmp_path: Path) -> None:
    from baton.llm.config import LLMConfig

    path = tmp_path / "llm.yaml"
    path.write_text("models:\n  a: {provider: scripted, cassette: c.yaml}\nmodels: {}\n")
    with pytest.raises(UsageError, match=r"duplicate key 'models' \(line 3; first at line 1\)"):
        LLMConfig.load(path)


# -- the command line -----------------------------------------------------------------------


def test_baton_validate_and_run_refuse_an_alias_bomb_with_exit_2(tmp_path: Path) -> None:
    plan = tmp_path / "laughs.yaml"
    plan.write_text(BOMB)
    for args in (["validate", plan], ["run", plan, "--db", tmp_path / "x.db"]):
        started = time.monotonic()
        done = baton(*args, timeout=30)
        assert time.monotonic() - started < QUICK_S  # start-up included
        assert done.returncode == 2, done.stderr
        assert "YAML aliases are not allowed (*a0, line 7)" in done.stderr and "Traceback" not in done.stderr


# -- the server -------------------------------------------------------------------------------

MAX_STEPS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `baton serve` (without keys, on loopback) refusing plans of more than 50 steps."""
    db = tmp_path_factory.mktemp("bounded") / "baton.db"
    port = _free_port()
    args = ["serve", "--db", str(db), "--port", str(port), "--no-auth", "--max-plan-steps", str(MAX_STEPS)]
    proc = subprocess.Popen(
        [*BATON, *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"baton serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "baton serve did not answer within 30 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _healthy(url: str) -> bool:
    return httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200


def test_the_server_refuses_an_alias_bomb_at_once_and_goes_on_answering(server: str) -> None:
    started = time.monotonic()
    answer = httpx.post(
        f"{server}/api/v1/runs", content=BOMB, headers={"Content-Type": "application/yaml"}, timeout=QUICK_S
    )
    assert time.monotonic() - started < QUICK_S
    assert answer.status_code == 422, answer.text
    assert "YAML aliases are not allowed (*a0, line 7)" in answer.json()["problems"][0]["message"]
    assert _healthy(server)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"name": "p", "steps": [{"id": "a", "task": "echo"}], "name": "q"}', "duplicate key 'name'"),
        ('{"name": "p", "steps": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64"),
        ('{"name": "p\\u0000", "steps": [{"id": "a", "task": "echo"}]}', "NUL characters"),
        (
            '{"name": "p", "steps": [{"id": "a", "task": "echo", "with": {"n": 1' + "0" * 30 + "}}]}",
            "out of range",
        ),
    ],
)
def test_the_server_refuses_what_the_reader_refuses(server: str, body: str, fragment: str) -> None:
    answer = httpx.post(
        f"{server}/api/v1/runs", content=body, headers={"Content-Type": "application/json"}, timeout=QUICK_S
    )
    assert answer.status_code == 422, answer.text
    assert fragment in answer.json()["problems"][0]["message"]
    assert _healthy(server)


def test_the_server_refuses_plans_past_its_max_plan_steps(server: str) -> None:
    client = httpx.Client(base_url=f"{server}/api/v1", timeout=QUICK_S)
    with client:
        refused = client.post("/runs", json={"name": "big", "steps": _steps(MAX_STEPS + 1)})
        assert refused.status_code == 422, refused.text
        assert refused.json()["problems"] == [
            {
                "where": "steps",
                "message": f"{MAX_STEPS + 1} steps; a plan may have at most 50 (max_plan_steps)",
            }
        ]
        assert client.post("/runs", json={"name": "ok", "steps": _steps(MAX_STEPS)}).status_code == 202


def _raw_post(url: str, headers: list[str], chunks: Iterator[bytes]) -> str:
    """Send a POST /runs by hand, stopping as soon as an answer comes; its status line."""
    host, port = url.removeprefix("http://").split(":")
    head = ["POST /api/v1/runs HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json", *headers]
    with socket.create_connection((host, int(port)), timeout=QUICK_S) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered: the rest is not needed
            sock.sendall(chunk)
        answer = b""
        while b"\r\n" not in answer:
            got = sock.recv(4096)
            if not got:
                break
            answer += got
    return answer.split(b"\r\n", 1)[0].decode("latin-1")


def test_a_body_past_the_limit_is_refused_as_it_is_read(server: str) -> None:
    from baton.api.app import MAX_BODY

    # Content-Length says it: refused before a byte of the body is sent
    started = time.monotonic()
    assert _raw_post(server, [f"Content-Length: {MAX_BODY + 1}"], iter([])).startswith("HTTP/1.1 413")
    assert time.monotonic() - started < QUICK_S
    # chunked, so no length is said: refused once the limit is read, the body still open
    mib = b"x" * (1024 * 1024)
    chunks = (f"{len(mib):x}\r\n".encode() + mib + b"\r\n" for _ in range(MAX_BODY // len(mib) + 2))
    assert _raw_post(server, ["Transfer-Encoding: chunked"], chunks).startswith("HTTP/1.1 413")
    assert _healthy(server)
