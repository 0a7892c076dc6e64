"""Built-in tasks that need nothing outside the machine: echo, sleep, fail, python, shell."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from baton.errors import TaskFailed
from baton.sandbox import NO_MAXIMA, Confinement, limit_problems, rlimits
from baton.tasks import procs
from baton.tasks.registry import TaskContext, TaskDef
from baton.tasks.threads import sync_threads

#: stdout/stderr beyond this many bytes are cut (the tail is kept: errors come last).
OUTPUT_LIMIT = 1 << 20
#: environment variables a shell step inherits; everything else is scrubbed.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
#: once a program's supervisor has exited, how long its output may take to reach EOF: no
#: process of its tree is left to hold the pipes, unless one escaped containment.
DRAIN_S = 1.0
#: how long a supervisor told to stop may take to end the tree before it is killed
STOP_S = 2.0


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
    return await sync_threads.run(lambda: fn(*(args or []), **(kwargs or {})), {})  # never holds an exit


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
    limits: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run a program by argv (never through a shell) in the run's working directory (a
    confined run's workspace, :mod:`baton.sandbox`), under ``limits`` when given (for a
    confined run, within its role's maxima, and its defaults otherwise).

    The program and every process it starts, in whatever session, end with the attempt: when
    the program exits, at the timeout, at a cancel, and when the engine's process dies.
    """
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise TaskFailed("shell: argv must be a non-empty list of strings")
    directory = _confined_cwd(ctx.workdir, cwd)
    child_env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    if ctx.confinement is not None:
        child_env = ctx.confinement.env()
    child_env.update({str(k): str(v) for k, v in (env or {}).items()})
    child_env["BATON_IDEMPOTENCY_KEY"] = ctx.idempotency_key
    code, stdout, stderr = await run_program(
        "shell", argv, directory, child_env, stdin, timeout_s, ctx.confinement, limits
    )
    if check and code != 0:
        detail = stderr.strip().splitlines()[-5:]
        raise TaskFailed(
            f"shell: {argv[0]} {_exited(code, limits, ctx.confinement)}"
            + (": " + " / ".join(detail) if detail else "")
        )
    return {"returncode": code, "stdout": stdout, "stderr": stderr}


async def run_program(
    who: str,
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    stdin: str | None,
    timeout_s: float | None,
    confinement: Confinement | None = None,
    limits: Mapping[str, int] | None = None,
) -> tuple[int, str, str]:
    """Run one program with its whole process tree contained (the one way baton runs a
    program: the shell task, the command validator); its exit code, stdout, stderr (their
    last OUTPUT_LIMIT bytes). Confined: checked against its role, as its user, with its
    limits and timeout. TaskFailed (``who`` says whose) when it cannot start or times out."""
    user = None
    if confinement is not None:
        problems = confinement.check(argv[0], limits)
        if problems:
            raise TaskFailed(f"{who}: " + "; ".join(problems))
        limits = {**confinement.limits, **(limits or {})}
        timeout_s = timeout_s if timeout_s is not None else confinement.timeout_s
        user = confinement.user
    elif limits:
        problems = limit_problems(limits, NO_MAXIMA)  # a local step's limits are its own
        if problems:
            raise TaskFailed(f"{who}: " + "; ".join(problems))
    try:
        program = await _Supervised.start(procs.spec(argv, env, user, rlimits(limits or {})), cwd, stdin)
    except OSError as exc:
        raise TaskFailed(f"{who}: cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            await program.proc.wait()
    except TimeoutError:
        await program.stop()
        raise TaskFailed(f"{who}: {argv[0]} timed out after {timeout_s}s and was killed") from None
    except BaseException:
        # Cancellation: the whole tree goes, whichever session its processes are in.
        await program.stop()
        raise
    report, out, err = await program.finish()
    if "error" in report:
        raise TaskFailed(f"{who}: cannot start {argv[0]!r}: {os.strerror(int(report['error']))}")
    # Without an exit report the supervisor was stopped or killed from outside, and the
    # program with it: its own exit code (-15, -9) says so.
    returncode = int(report["exit"]) if "exit" in report else program.proc.returncode
    assert returncode is not None
    return returncode, _tail(out), _tail(err)


def _exited(code: int, limits: Mapping[str, int] | None, confinement: Confinement | None) -> str:
    """How a program ended, in words: its limits say why a signal came."""
    given = {**(confinement.limits if confinement else {}), **(limits or {})}
    if code == -signal.SIGXCPU and "cpu_s" in given:
        return f"was stopped at its CPU limit ({given['cpu_s']} s, limits.cpu_s)"
    if code == -signal.SIGXFSZ and "file_mb" in given:
        return f"was stopped writing a file past its limit ({given['file_mb']} MiB, limits.file_mb)"
    return f"exited with {code}"


def _file(fd: int, mode: str) -> Any:
    return os.fdopen(fd, mode, buffering=0)


class _Received(asyncio.Protocol):
    """What arrives on a pipe or a socket (its last OUTPUT_LIMIT bytes and more), until EOF."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > 2 * OUTPUT_LIMIT:
            del self.data[:-OUTPUT_LIMIT]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Supervised:
    """A program run under its supervisor (:mod:`baton.tasks.procs`), which holds its whole
    process tree: the supervisor's process, and the program's output and the supervisor's
    reports as they arrive. Asyncio's own pipes are not used: a process exits for asyncio
    only when its pipes close, which a grandchild holding stdout can put off forever."""

    def __init__(self) -> None:
        self.stdout, self.stderr, self.reports = _Received(), _Received(), _Received()
        self.transports: list[asyncio.BaseTransport] = []
        self.stdin: asyncio.WriteTransport | None = None
        self.proc: asyncio.subprocess.Process

    @classmethod
    async def start(cls, spec: bytes, cwd: Path, stdin: str | None) -> _Supervised:
        """Start the supervisor, its ``spec`` sent, its reports and the program's output read."""
        self = cls()
        ours, theirs = socket.socketpair()
        given = [theirs.detach()]  # the supervisor's ends, closed here once it has them
        try:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_connection(lambda: self.reports, sock=ours)
            self.transports.append(transport)
            transport.write(spec)
            transport.write_eof()
            stdout, stderr = await self._pipe(self.stdout, given), await self._pipe(self.stderr, given)
            if stdin is not None:
                read, write = os.pipe()
                given.append(read)
                self.stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, _file(write, "wb"))
                self.stdin.write(stdin.encode())
                self.stdin.close()
            self.proc = await asyncio.create_subprocess_exec(
                *procs.supervisor_argv(given[0]),
                cwd=cwd,
                env={},
                stdin=given[-1] if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=given[:1],
                start_new_session=True,
            )
        except BaseException:
            if not self.transports:
                ours.close()  # otherwise its transport closes it
            self.close()
            raise
        finally:
            for fd in given:
                os.close(fd)
        return self

    async def _pipe(self, received: _Received, given: list[int]) -> int:
        """A pipe that ``received`` reads; its writing end, added to ``given``."""
        read, write = os.pipe()
        given.append(write)
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: received, _file(read, "rb"))
        self.transports.append(pipe)
        return write

    def _kill_cgroup(self) -> None:
        path = procs.read_report(bytes(self.reports.data)).get("cgroup")
        if path:
            procs.kill_cgroup(path)

    def _signal(self, signum: int) -> None:
        if self.proc.returncode is None:  # not reaped: the pid is still the supervisor's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    async def stop(self) -> None:
        """End the tree now: its cgroup here, the rest by the supervisor, which is killed
        (its program dies with it) if it takes longer than STOP_S."""
        try:
            self._kill_cgroup()
            self._signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_S):
                    await self.proc.wait()
            except TimeoutError:
                self._kill_cgroup()
                self._signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_S):
                        await self.proc.wait()
        finally:
            self.close()

    async def finish(self) -> tuple[dict[str, str], bytes, bytes]:
        """Once the supervisor has exited: its reports, the program's stdout and stderr."""
        try:
            # Bounded: nothing of the tree is left to write, unless it escaped containment.
            await asyncio.wait([self.stdout.closed, self.stderr.closed, self.reports.closed], timeout=DRAIN_S)
            self._kill_cgroup()  # in case the supervisor itself was killed
        finally:
            self.close()
        return procs.read_report(bytes(self.reports.data)), bytes(self.stdout.data), bytes(self.stderr.data)

    def close(self) -> None:
        """Stop reading and writing; idempotent."""
        if self.stdin is not None and self.stdin.get_write_buffer_size():
            self.stdin.abort()  # unread input (once all is written, close() has closed the pipe)
        for transport in self.transports:
            transport.close()


BUILTINS = [
    TaskDef.of("echo", echo),
    TaskDef.of("sleep", sleep, estimate=_sleep_estimate),
    TaskDef.of("fail", fail),
    TaskDef.of("python", python, needs=("python",)),
    TaskDef.of("shell", shell, needs=("shell",)),
]
