"""`baton nats`: the engine on NATS (request-reply subjects, events to JetStream)."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer
from rich.text import Text

from baton.cli import (
    EXIT_OK,
    DbOption,
    ImportOption,
    LeaseOption,
    LlmOption,
    PolicyOption,
    PoolOption,
    SandboxUserOption,
    WorkspacesOption,
    _engine,
    _err,
    _execute,
    _import_modules,
    _Session,
    app,
)
from baton.engine import DEFAULT_LEASE_S
from baton.policy import Policy
from baton.store import DEFAULT_DB

# baton.api.nats's defaults, written out: importing it (and nats-py) is left to the command,
# so that every other command starts without it.
DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = "baton"
DEFAULT_STREAM = "BATON_EVENTS"


@app.command("nats")
def nats_command(
    db: DbOption = DEFAULT_DB,
    url: Annotated[
        str, typer.Option("--url", envvar="BATON_NATS_URL", help="The NATS server.")
    ] = DEFAULT_URL,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Subject prefix: <prefix>.runs.*, <prefix>.execute, events.")
    ] = DEFAULT_PREFIX,
    stream: Annotated[
        str, typer.Option("--stream", help="JetStream stream for run events (made if missing).")
    ] = DEFAULT_STREAM,
    grace_s: Annotated[
        float, typer.Option("--grace-s", min=0, help="On SIGTERM/Ctrl-C, let requests in flight finish.")
    ] = 10.0,
    modules: ImportOption = None,
    lease_s: LeaseOption = DEFAULT_LEASE_S,
    llm: LlmOption = None,
    pool: PoolOption = None,
    policy: PolicyOption = None,
    workspaces: WorkspacesOption = None,
    sandbox_user: SandboxUserOption = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="No API keys in requests: every caller is an operator (local use)."),
    ] = False,
    creds: Annotated[
        str | None,
        typer.Option("--creds", envvar="BATON_NATS_CREDS", metavar="FILE", help="NATS creds file."),
    ] = None,
    nkey: Annotated[
        str | None,
        typer.Option("--nkey", envvar="BATON_NATS_NKEY", metavar="FILE", help="NATS nkey seed file."),
    ] = None,
    tls_ca: Annotated[
        str | None, typer.Option("--tls-ca", envvar="BATON_NATS_TLS_CA", metavar="FILE", help="CA to trust.")
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option("--tls-cert", envvar="BATON_NATS_TLS_CERT", metavar="FILE", help="Client certificate."),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option("--tls-key", envvar="BATON_NATS_TLS_KEY", metavar="FILE", help="Its private key."),
    ] = None,
) -> None:
    """Answer runs.start|get|pause|resume|cancel and execute on NATS, publish run events to
    JetStream, with a worker in this process; until SIGTERM or Ctrl-C (exit 0).

    Every request needs an API key (`baton keys create`) in its headers,
    `Authorization: Bearer <key>`, unless --no-auth. A user and password or a token for the
    NATS server go in the URL (nats://user:password@host:4222)."""
    session = _Session(False, db)

    async def body() -> int:
        from baton.api.nats import NatsInterface, connect_options

        options = connect_options(
            creds=creds, nkey_seed=nkey, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        _import_modules(modules)
        engine = _engine(
            db, lease_s=lease_s, llm=llm, pool=pool, workspaces=workspaces, sandbox_user=sandbox_user
        )
        if policy is not None:
            engine.policy = Policy.load(policy)
        interface = NatsInterface(
            engine, url, prefix=prefix, stream=stream, auth=not no_auth, connect_options=options
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with engine:
                await engine.start_worker()
                await interface.start()
                try:
                    subjects = f"{prefix}.runs.{{start,get,pause,resume,cancel}}, {prefix}.execute"
                    _err.print(
                        Text(
                            f"baton nats on {url}: {subjects}; events to stream {stream} "
                            f"({interface.events_subject}); database {engine.store.url}"
                        )
                    )
                    await stop.wait()
                    _err.print(Text(f"stopping: requests in flight get {grace_s:g}s to finish"))
                finally:
                    await interface.stop(grace_s)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        _err.print(Text("baton nats stopped"))
        return EXIT_OK

    _execute(session, body)
