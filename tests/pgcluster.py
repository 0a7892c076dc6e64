"""A PostgreSQL cluster of a test's own: ``initdb`` into a fresh directory, ``pg_ctl start``
on a free port of 127.0.0.1, stopped (``fast`` or ``immediate``) and started again at will.

For tests that must not touch the shared server: ones that exhaust its connections, set
its limits, or restart it under load. The server binaries are looked for on ``PATH`` and
under ``/usr/lib/postgresql/*/bin``; :func:`require_cluster` skips a test (with the reason)
when there are none, or fails it under ``BATON_REQUIRE_SERVICES=1``.

PostgreSQL refuses to run as root, so when the tests do, the cluster runs as the
``postgres`` OS user (``runuser``) in a directory of its own under the system's temporary
directory (pytest's ``tmp_path`` sits under a root-only one).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import pytest

from tests.conftest import REQUIRE_SERVICES

StopMode = Literal["smart", "fast", "immediate"]


def pg_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent

    def version(path: Path) -> int:
        match = re.search(r"/(\d+)/bin$", str(path))
        return int(match.group(1)) if match else 0

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    return next((d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """One PostgreSQL server in ``root`` (``root/data``, its log ``root/server.log``).

    ``settings`` are server parameters (``max_connections=8``...), given on each start.
    Connect as the superuser ``postgres`` (trust authentication, TCP on 127.0.0.1 only).
    """

    def __init__(
        self,
        root: Path,
        bindir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.root = root
        self.bindir = bindir
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port or free_port()
        self.settings: dict[str, object] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",  # TCP only: no socket path to agree on
            # Speed: these matter when the machine crashes, not when the server is killed.
            "fsync": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self._user = self._run_as()

    @staticmethod
    def _run_as() -> list[str]:
        """The prefix that runs a server binary as a user PostgreSQL accepts (not root)."""
        if os.geteuid() != 0:
            return []
        runuser = shutil.which("runuser")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            raise RuntimeError("running as root, and no runuser and 'postgres' user to run PostgreSQL as")
        return [runuser, "-u", "postgres", "--"]

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self._user, str(self.bindir / tool), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr}{log}")
        return done

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = " ".join(f"-c {k}={shlex.quote(str(v))}" for k, v in self.settings.items())  # via sh
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", f"-p {self.port} {options}", "start",
        )  # fmt: skip

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``fast`` disconnects clients and shuts down cleanly, ``immediate``
        kills it (like a crash: the next start recovers)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, dbname: str = "postgres", **options: object) -> str:
        """A libpq URL of the server (``options`` as its query: application_name, schema...)."""
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def pg_cluster(**settings: object) -> Iterator[PgCluster]:
    """A started cluster, stopped (``immediate``) and deleted on exit.

    Skips the test when no PostgreSQL server binaries are installed (fails under
    ``BATON_REQUIRE_SERVICES=1``).
    """
    bindir = require_cluster()
    root = Path(tempfile.mkdtemp(prefix="baton-pg-"))
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = PgCluster(root, bindir, settings=settings)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running:
                cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def require_cluster() -> Path:
    """The directory of the server binaries; skip (or fail, under BATON_REQUIRE_SERVICES=1)
    when there is none."""
    bindir = pg_bindir()
    if bindir is None:
        message = "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} (BATON_REQUIRE_SERVICES=1 requires them)")
        pytest.skip(message)
    return bindir
