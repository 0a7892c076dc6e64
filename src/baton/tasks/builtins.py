"""Built-in tasks that need nothing outside the machine: echo, sleep, fail, python, shell."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from baton.errors import TaskFailed
from baton.tasks.registry import TaskContext, TaskDef

#: stdout/stderr beyond this many bytes are cut (the tail is kept: errors come last).
OUTPUT_LIMIT = 1 << 20
#: environment variables a shell step inherits; everything else is scrubbed.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


async def echo(**inputs: Any) -> dict[str, Any]:
    """Return the inputs as the output."""
    return inputs


async def sleep(seconds: float) -> dict[str, float]:
    """Wait ``seconds`` and return them."""
    if not isinstance(seconds, int | float) or seconds < 0:
        raise TaskFailed(f"sleep: seconds must be a number >= 0, got {seconds!r}")
    await asyncio.sleep(seconds)
    return {"slept_s": float(seconds)}


def _sleep_estimate(inputs: Mapping[str, Any]) -> float | None:
    seconds = inputs.get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


async def fail(
    ctx: TaskContext, times: int | None = None, message: str = "injected failure"
) -> dict[str, int]:
    """Fail the first ``times`` attempts (every attempt when ``times`` is absent)."""
    if times is None or ctx.attempt <= times:
        raise TaskFailed(f"{message} (attempt {ctx.attempt})")
    return {"attempt": ctx.attempt}


def _import_callable(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise TaskFailed(f"python: function must look like 'package.module:function', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskFailed(f"python: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TaskFailed(f"python: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise TaskFailed(f"python: {path!r} is not callable")
    return target


async def python(function: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Any:
    """Call a Python callable named by dotted path ('package.module:function')."""
    fn = _import_callable(function)
    if inspect.iscoroutinefunction(fn):
        return await fn(*(args or []), **(kwargs or {}))
    return await asyncio.to_thread(fn, *(args or []), **(kwargs or {}))


def _confined_cwd(workdir: Path, cwd: str | None) -> Path:
    root = workdir.resolve()
    target = (root / cwd).resolve() if cwd else root
    if target != root and root not in target.parents:
        raise TaskFailed(f"shell: cwd {cwd!r} leaves the working directory {root}")
    if not target.is_dir():
        raise TaskFailed(f"shell: cwd {cwd!r} is not a directory")
    return target


def _tail(data: bytes) -> str:
    if len(data) > OUTPUT_LIMIT:
        data = data[-OUTPUT_LIMIT:]
    return data.decode("utf-8", errors="replace")


async def shell(
    ctx: TaskContext,
    argv: list[str],
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout_s: float | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Run a program by argv (never through a shell) in the run's working directory."""
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise TaskFailed("shell: argv must be a non-empty list of strings")
    directory = _confined_cwd(ctx.workdir, cwd)
    child_env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    child_env.update({str(k): str(v) for k, v in (env or {}).items()})
    child_env["BATON_IDEMPOTENCY_KEY"] = ctx.idempotency_key
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=directory,
            env=child_env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise TaskFailed(f"shell: cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise TaskFailed(f"shell: {argv[0]} timed out after {timeout_s}s and was killed") from None
    except BaseException:
        # Timeout or cancellation: the whole process group goes, not just the leader.
        _kill_group(proc)
        await proc.wait()
        raise
    stdout, stderr = _tail(out), _tail(err)
    if check and proc.returncode != 0:
        detail = stderr.strip().splitlines()[-5:]
        raise TaskFailed(
            f"shell: {argv[0]} exited with {proc.returncode}" + (": " + " / ".join(detail) if detail else "")
        )
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


BUILTINS = [
    TaskDef.of("echo", echo),
    TaskDef.of("sleep", sleep, estimate=_sleep_estimate),
    TaskDef.of("fail", fail),
    TaskDef.of("python", python),
    TaskDef.of("shell", shell),
]
