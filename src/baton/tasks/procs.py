"""A step's process tree, contained: nothing a shell step starts outlives its attempt.

The engine does not start a step's program itself. It starts this file as a supervisor
(``python -I -S procs.py FD``, in a session of its own), which starts the program and stays
its parent until every process of the program's tree is gone. The supervisor

- follows the engine: it ends the tree and exits when the engine's process dies, even by
  ``kill -9`` (``PR_SET_PDEATHSIG``, and a check that the engine did not die before that);
- adopts the tree: as a child subreaper it becomes the parent of every orphaned descendant,
  those that ``setsid`` or double-fork included, so that it can find and kill them all;
- puts the program in a cgroup v2 of its own where the machine lets it (``cgroup.kill`` ends
  a tree at once; and a cgroup whose supervisor died is found and killed by the next
  supervisor on the machine), and does without one otherwise;
- ends the tree when the program exits, and when it receives SIGTERM (a timeout or a
  cancel); then exits.

The program itself gets ``PR_SET_PDEATHSIG(SIGKILL)``: it dies with its supervisor. What is
left uncovered: without cgroup v2, the other descendants of a supervisor that is itself
killed by SIGKILL survive it.

A confined step's program (:mod:`baton.sandbox`) takes its resource limits and drops to
its user in the forked child, before its parent-death signal is set (a change of user
clears it) and before exec; the supervisor stays the server's user, which can kill it.

Over the socket it is given, the supervisor reads the program's spec (JSON: argv,
environment, the engine's pid, the user and limits) until EOF, then writes lines: ``cgroup PATH``, ``error
ERRNO`` (the program could not be started), ``exit CODE`` (negative: killed by that signal).
Stopped by SIGTERM, it dies of SIGTERM once the tree is gone. It imports only what it needs,
which keeps its start near 20 ms: the engine's side is in :mod:`baton.tasks.builtins`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import sys
import time

TYPE_CHECKING = False  # not the typing module's: importing it would slow every start
if TYPE_CHECKING:
    from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: how long a supervisor goes on killing and reaping a tree that does not go
SWEEP_S = 5.0
#: the name of a program's cgroup: this, the supervisor's pid, a dash, its start time
CGROUP_PREFIX = "baton-"


def supervisor_argv(fd: int) -> list[str]:
    """The command that starts a supervisor reading its spec from socket ``fd``."""
    return [sys.executable, "-I", "-S", __file__, str(fd)]


def spec(
    argv: list[str],
    env: dict[str, str],
    user: tuple[int, int] | None = None,
    rlimits: list[tuple[int, int, int]] | None = None,
) -> bytes:
    """What the engine sends a supervisor: the program, its environment, who to follow,
    and for a confined step the user (uid, gid) to run it as and its ``setrlimit`` calls."""
    program = {"argv": argv, "env": env, "parent": os.getpid(), "user": user, "rlimits": rlimits or []}
    return json.dumps(program).encode()


def read_report(data: bytes) -> dict[str, str]:
    """The lines a supervisor wrote, by their first word."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return {key: value for key, _, value in (line.partition(" ") for line in lines)}


def kill_cgroup(path: str) -> None:
    """Kill every process in the cgroup at ``path``; nothing if it is gone."""
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
        f.write("1")


# -- the supervisor --------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM: from the engine (a timeout, a cancel), or sent at the engine's death."""


_sweeping = False


def _on_sigterm(signum: int, frame: object) -> None:
    if not _sweeping:
        raise _Stop


def _prctl(option: int, value: int) -> None:
    # Not Linux: the process group and the sweep of /proc are what is left.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, ctypes.c_ulong(value), 0, 0, 0)


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot); None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _own_cgroup_dir() -> str | None:
    """The directory of this process's cgroup v2, where a cgroup v2 is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            own = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    if own is None or not own.startswith("/") or "/.." in own:
        return None  # outside this cgroup namespace
    for mount in mounts:
        left, sep, right = mount.partition(" - ")
        if not sep or right.split()[:1] != ["cgroup2"]:
            continue
        fields = left.split()
        root, point = _unescape(fields[3]).rstrip("/"), _unescape(fields[4])
        if own == root or own.startswith(root + "/"):
            return os.path.normpath(point + own[len(root) :])
    return None


def _kill_orphans(parent: str) -> None:
    """Kill the cgroups left by supervisors that died (a SIGKILL leaves them no time)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid, _, started = name.removeprefix(CGROUP_PREFIX).partition("-")
        if name.startswith(CGROUP_PREFIX) and pid.isdigit() and _start_time(int(pid)) != started:
            path = os.path.join(parent, name)
            kill_cgroup(path)
            _remove(path, time.monotonic() + 0.1)  # still busy? the next supervisor removes it


def _new_cgroup() -> str | None:
    """A cgroup for the program beside this process's own; None where cgroup v2 is not
    mounted, not writable, or has no ``cgroup.kill`` (Linux before 5.14)."""
    parent = _own_cgroup_dir()
    if parent is None:
        return None
    _kill_orphans(parent)
    path = os.path.join(parent, f"{CGROUP_PREFIX}{os.getpid()}-{_start_time(os.getpid())}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        _remove(path, time.monotonic())
        return None
    return path


def _remove(path: str, until: float) -> None:
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # busy until its last process has exited
            if time.monotonic() > until:
                return
            time.sleep(0.01)


def _exec(program: dict[str, Any], cgroup: str | None, supervisor: int, failed: int) -> None:
    """In the forked child: enter the cgroup, take the limits and the user it is given,
    tie it to the supervisor, become the program."""
    argv, env = program["argv"], program["env"]
    candidates = _candidates(argv[0], env)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; programs expect them
        signal.signal(signum, signal.SIG_DFL)
    os.setpgid(0, 0)
    if cgroup is not None:
        # Where it may not move there, the subreaper still holds the tree.
        with contextlib.suppress(OSError), open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    try:
        for which, soft, hard in program["rlimits"]:
            resource.setrlimit(which, (soft, hard))
        if program["user"] is not None:  # for good: no way back to the server's user
            uid, gid = program["user"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
    except (OSError, ValueError) as exc:
        os.write(failed, str(getattr(exc, "errno", None) or errno.EPERM).encode())
        return
    # After the user changed: a change of credentials clears the parent-death signal.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        return  # the supervisor died before the line above
    code = errno.ENOENT
    for path in candidates:  # os.execvpe imports a module, which its new user may not read
        try:
            os.execve(path, argv, env)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or code == errno.ENOENT:
                code = exc.errno or errno.ENOEXEC
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                break
        except ValueError:  # a NUL byte in argv or env
            code = errno.EINVAL
            break
    os.write(failed, str(code).encode())


def _candidates(program: str, env: dict[str, str]) -> list[str]:
    """The files ``program`` may be, in the order exec tries them (PATH, as execvp does)."""
    if "/" in program:
        return [program]
    dirs = env.get("PATH", os.defpath).split(os.pathsep)
    return [os.path.join(d or ".", program) for d in dirs]


def _start(program: dict[str, Any], cgroup: str | None) -> int:
    """Fork and exec the program; its pid, or OSError when it could not be started."""
    failed_r, failed_w = os.pipe()  # close-on-exec: EOF with nothing in it means exec worked
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(failed_r)
            _exec(program, cgroup, supervisor, failed_w)
        finally:
            os._exit(127)
    os.close(failed_w)
    with open(failed_r, "rb") as f:
        failure = f.read()
    if failure:
        os.waitpid(pid, 0)
        code = int(failure)
        raise OSError(code, os.strerror(code))
    return pid


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _sweep(cgroup: str | None, leader: int | None) -> None:
    """Kill and reap every process of the tree, then remove its cgroup.

    Orphans come to this subreaper, so once it has no child left nothing of the tree is.
    """
    global _sweeping
    _sweeping = True
    if leader is not None:  # its group (whose id is not reused while it has members)
        with contextlib.suppress(OSError):
            os.killpg(leader, signal.SIGKILL)
    deadline = time.monotonic() + SWEEP_S
    while True:
        if cgroup is not None:
            kill_cgroup(cgroup)
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if cgroup is not None:
        _remove(cgroup, deadline)


def _say(channel: int, key: str, value: object) -> None:
    with contextlib.suppress(OSError):  # the engine is gone: the sweep is all that matters now
        os.write(channel, f"{key} {value}\n".encode())


def main(argv: list[str]) -> None:
    """Supervise one program, as described above; ``argv``: this file, the socket's fd."""
    channel = int(argv[1])
    signal.signal(signal.SIGTERM, _on_sigterm)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    os.set_inheritable(channel, False)  # the program must not hold it
    cgroup: str | None = None
    pid: int | None = None
    stopped = False
    try:
        chunks = []
        while chunk := os.read(channel, 1 << 16):
            chunks.append(chunk)
        program = json.loads(b"".join(chunks))
        if os.getppid() != program["parent"]:
            return  # the engine died before PR_SET_PDEATHSIG was set
        cgroup = _new_cgroup()
        if cgroup is not None:
            _say(channel, "cgroup", cgroup)
        try:
            pid = _start(program, cgroup)
        except OSError as exc:
            _say(channel, "error", exc.errno or 0)
            return
        while True:
            reaped, status = os.waitpid(-1, 0)  # adopted orphans are reaped here too
            if reaped == pid:
                _say(channel, "exit", os.waitstatus_to_exitcode(status))
                break
    except _Stop:
        stopped = True
    finally:
        while True:
            try:
                _sweep(cgroup, pid)
                break
            except _Stop:  # arrived before the sweep began: begin again
                stopped = True
    if stopped:  # die of it, so that the engine sees the program was stopped (-SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main(sys.argv)
