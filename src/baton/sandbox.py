"""Confinement for the programs of steps that API callers run.

A run submitted by the holder of an API key (REST, NATS), or a plan that asks for it
(``policy: {sandbox: true}``), is *confined*: the programs its steps start (the ``shell``
task, the ``command`` validator) run

- in a workspace of the run's own, ``ROOT/RUN_ID`` (the server's ``--workspaces``, by
  default ``.baton/workspaces`` beside the database), never the server's working
  directory; a step's ``cwd`` stays inside it, symlinks resolved;
- as another user when the server is root (``nobody`` unless ``--sandbox-user`` says
  otherwise, with no supplementary groups): that user cannot read the server's database
  (created 0600), its environment (``/proc/PID/environ`` is its owner's), or files only
  the server's user may read, and cannot write outside the workspace but in the places
  anyone may write (``/tmp``);
- with an environment of their own (PATH, LANG, TZ; HOME and TMPDIR the workspace);
- under resource limits (:data:`DEFAULT_LIMITS`: CPU seconds, address space, processes,
  file size, open files), which a step may lower or raise up to its role's maxima (the
  policy's ``roles.NAME.limits``), and a default timeout;
- only if their role may start them: the policy's ``roles.NAME.programs`` lists the
  programs a role may start (by name, found on PATH, or by absolute path; ``"*"``: any).
  A role granted ``shell`` without a list may start any program but shells and
  interpreters (:data:`INTERPRETERS`), and nothing by a path.

What it does not do: a program a role may start can itself start any other (``make``,
``find -exec``): the list is what a step asks for, the user and the limits are what
holds. When the server is not root, the programs run as the server's user, who can read
what the server can (keep the server's secrets out of files that user can read, or run
the server as root in its container so that steps run as ``nobody``). The network is not
confined. ``python`` steps and validators run inside the server's process: the
``python`` capability is the server's own power, the admin role's alone by default.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import pwd
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from baton.errors import UsageError

log = structlog.get_logger("baton.sandbox")

#: a step's limits by name: the resource, and the unit a value is in
LIMITS: dict[str, tuple[int, int]] = {
    "cpu_s": (resource.RLIMIT_CPU, 1),
    "memory_mb": (resource.RLIMIT_AS, 1 << 20),
    "processes": (resource.RLIMIT_NPROC, 1),
    "file_mb": (resource.RLIMIT_FSIZE, 1 << 20),
    "open_files": (resource.RLIMIT_NOFILE, 1),
}
#: what a confined program gets unless its step says otherwise; also each role's maxima
#: unless the policy says otherwise
DEFAULT_LIMITS: dict[str, int] = {
    "cpu_s": 600,
    "memory_mb": 4096,
    "processes": 256,
    "file_mb": 1024,
    "open_files": 1024,
}
#: the maxima of limits that have none (a local step's own, a policy's own maxima)
NO_MAXIMA: dict[str, int] = {name: 1 << 40 for name in DEFAULT_LIMITS}
#: how long a confined program may run when its step gives no timeout
DEFAULT_TIMEOUT_S = 900.0
#: a confined program given more CPU seconds than its limit gets SIGXCPU, then after
#: this many more SIGKILL
CPU_GRACE_S = 5
#: programs that run whatever they are given: a role may start them only when its
#: policy lists them by name
INTERPRETERS = frozenset(
    {
        "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "csh", "tcsh", "fish", "busybox",
        "env", "xargs", "nohup", "setsid", "timeout", "nice", "ionice", "stdbuf", "chroot",
        "unshare", "nsenter", "sudo", "su", "doas", "runuser", "setpriv", "script",
        "python", "perl", "ruby", "node", "nodejs", "deno", "bun", "php", "lua", "luajit",
        "tclsh", "wish", "expect", "rscript", "r", "julia", "java", "jshell", "pwsh",
        "awk", "gawk", "mawk", "nawk", "sed", "find", "gdb", "vim", "vi", "emacs", "ed",
    }
)  # fmt: skip
#: the environment a confined program starts with (before its step's own ``env``)
CONFINED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def is_interpreter(name: str) -> bool:
    """Whether ``name`` (a program's file name) is a shell or an interpreter:
    ``python3.11``, ``perl5.36`` and ``bash`` are."""
    base = name.lower().rstrip("0123456789.-")
    return base in INTERPRETERS or name.lower() in INTERPRETERS


def program_problem(program: str, allowed: tuple[str, ...] | None) -> str | None:
    """Why a role whose programs are ``allowed`` may not start ``program`` (argv[0]);
    None when it may. ``allowed`` None: any program but :data:`INTERPRETERS`, by name."""
    if allowed is not None and "*" in allowed:
        return None
    if "/" in program:
        if allowed is not None and posixpath.normpath(program) in allowed and program.startswith("/"):
            return None
        return f"{program!r} is a path: a confined step starts programs by name (found on PATH)"
    if allowed is None:
        if is_interpreter(program):
            return f"{program!r} runs whatever it is given; the role may start it only if its policy names it"
        return None
    if program in allowed:
        return None
    return f"{program!r} is not among the programs the role may start ({', '.join(allowed) or 'none'})"


def limit_problems(limits: Any, maxima: Mapping[str, int]) -> list[str]:
    """What is wrong with a step's ``limits`` (a mapping of :data:`LIMITS` names to
    whole numbers of at least 1), each within ``maxima``."""
    if not isinstance(limits, Mapping):
        return [f"limits must be a mapping of {', '.join(LIMITS)} to numbers"]
    problems = []
    for name, value in limits.items():
        if name not in LIMITS:
            problems.append(f"unknown limit {name!r} (known: {', '.join(LIMITS)})")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"limit {name} must be a whole number of at least 1, not {value!r}")
        elif value > maxima.get(name, DEFAULT_LIMITS[name]):
            problems.append(
                f"limit {name} {value} is above the role's maximum, {maxima.get(name, DEFAULT_LIMITS[name])}"
            )
    return problems


def rlimits(limits: Mapping[str, int]) -> list[tuple[int, int, int]]:
    """The ``setrlimit`` calls (resource, soft, hard) that impose ``limits``."""
    calls = []
    for name, value in limits.items():
        which, unit = LIMITS[name]
        hard = value + CPU_GRACE_S if name == "cpu_s" else value * unit
        calls.append((which, value * unit, hard))
    return calls


@dataclass(frozen=True, slots=True)
class Confinement:
    """What one confined step's programs run in (see the module's text)."""

    workspace: Path
    #: the user (uid, gid) its programs run as; None: the server's own
    user: tuple[int, int] | None
    #: the programs its role may start (None: any but interpreters)
    programs: tuple[str, ...] | None = None
    #: the limits its programs get unless the step asks for others
    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    #: how far the step may raise them
    maxima: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: the step role it runs under (None: a local plan's step)
    role: str | None = None

    def check(self, argv0: str, limits: Any = None) -> list[str]:
        """Why this step may not start ``argv0`` with ``limits`` (empty: it may)."""
        problem = program_problem(argv0, self.programs)
        return ([problem] if problem else []) + (limit_problems(limits, self.maxima) if limits else [])

    def env(self) -> dict[str, str]:
        """The environment a confined program starts with."""
        env = {k: os.environ[k] for k in CONFINED_ENV if k in os.environ}
        env["HOME"] = env["TMPDIR"] = str(self.workspace)
        return env


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Where the workspaces of confined runs are, and who their programs run as."""

    root: Path
    user: tuple[int, int] | None
    #: how long a confined program may run when its step gives no timeout
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def of(cls, root: str | Path, user: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Sandbox:
        """Workspaces under ``root``; programs run as ``user`` (a name or a uid), by
        default ``nobody`` when this process is root and its own user otherwise."""
        if user is not None and os.geteuid() != 0:
            raise UsageError(
                f"--sandbox-user {user}: only a server running as root can run steps as another user"
            )
        ids = None
        if os.geteuid() == 0:
            try:
                ids = _user(user or "nobody")
            except UsageError:
                if user is not None:
                    raise
                # no nobody on this machine: said, and the programs run as root
                log.warning("no user nobody here: confined programs run as root (set --sandbox-user)")
        return cls(Path(root).absolute(), ids, timeout_s)

    def workspace(self, run_id: str) -> Path:
        """The workspace of run ``run_id``, made if missing (its programs' user owns it)."""
        path = self.root / run_id
        if path.is_dir():
            return path
        try:
            self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
            if self.user is not None:
                os.chown(path, *self.user)
        except OSError as exc:
            raise UsageError(f"cannot make the workspace {path}: {exc.strerror or exc}") from None
        return path

    def workspaces(self, before: float) -> list[tuple[str, int | None, Path]]:
        """The workspaces not changed since ``before``: (run id, job id or None, path)."""
        found: list[tuple[str, int | None, Path]] = []
        with contextlib.suppress(OSError), os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if not entry.is_dir(follow_symlinks=False) or entry.stat().st_mtime >= before:
                        continue
                    job = entry.name.removeprefix("job-")
                    job_id = int(job) if entry.name.startswith("job-") and job.isdigit() else None
                    found.append((entry.name, job_id, Path(entry.path)))
        return found


def _user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise UsageError(f"--sandbox-user {name}: there is no such user on this machine") from None
    if entry.pw_uid == 0:
        raise UsageError(f"--sandbox-user {name}: is root, which confines nothing")
    return entry.pw_uid, entry.pw_gid


__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT_S",
    "INTERPRETERS",
    "LIMITS",
    "NO_MAXIMA",
    "Confinement",
    "Sandbox",
    "is_interpreter",
    "limit_problems",
    "program_problem",
    "rlimits",
]
