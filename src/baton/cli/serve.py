"""`baton serve` (the REST API) and `baton keys` (its API keys)."""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from baton import audit
from baton.api.auth import ROLES, create_key
from baton.api.limits import DEFAULT_PER_ADDRESS, DEFAULT_PER_KEY, Limits
from baton.cli import (
    EXIT_OK,
    DbOption,
    ImportOption,
    JsonOption,
    LeaseOption,
    LlmOption,
    PolicyOption,
    PoolOption,
    SandboxUserOption,
    WorkspacesOption,
    _emit_json,
    _engine,
    _execute,
    _import_modules,
    _local,
    _out,
    _Session,
    app,
)
from baton.engine import DEFAULT_LEASE_S
from baton.errors import UsageError
from baton.plan.validate import MAX_PLAN_STEPS
from baton.policy import Policy
from baton.store import DEFAULT_DB
from baton.views import KeyView

keys_app = typer.Typer(help="API keys of `baton serve`: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


@app.command()
def serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No API keys (local use only: refused off loopback).")
    ] = False,
    nats: Annotated[
        str | None, typer.Option("--nats", metavar="URL", help="Also answer on NATS (nats://host:4222).")
    ] = None,
    modules: ImportOption = None,
    lease_s: LeaseOption = DEFAULT_LEASE_S,
    llm: LlmOption = None,
    pool: PoolOption = None,
    policy: PolicyOption = None,
    workspaces: WorkspacesOption = None,
    sandbox_user: SandboxUserOption = None,
    rate_limit: Annotated[
        str,
        typer.Option(
            "--rate-limit", metavar="RATE", help="Requests per key, e.g. 200/second, 5000/minute, or none."
        ),
    ] = DEFAULT_PER_KEY,
    rate_limit_address: Annotated[
        str,
        typer.Option(
            "--rate-limit-address",
            metavar="RATE",
            help="Requests without a valid key, per client address (guessing keys), or none.",
        ),
    ] = DEFAULT_PER_ADDRESS,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="With --no-auth: another name this server answers to (besides its address and localhost).",
        ),
    ] = None,
    max_plan_steps: Annotated[
        int, typer.Option("--max-plan-steps", min=1, metavar="N", help="Refuse plans of more than N steps.")
    ] = MAX_PLAN_STEPS,
) -> None:
    """Serve the REST API (under /api/v1, OpenAPI at /docs), with a worker in this process."""
    session = _Session(False, db)

    async def body() -> int:
        if no_auth and not loopback(host):
            raise UsageError(
                f"--no-auth would open {host} to anyone: serve on a loopback address, or use keys"
            )
        limits = Limits(rate_limit, rate_limit_address)  # a bad rate is exit 2 before anything starts
        _import_modules(modules)
        import uvicorn  # the server and the web framework load for `serve` only

        from baton.api.app import create_app
        from baton.api.local import allowed_hosts as local_hosts
        from baton.api.nats import options_from_env as nats_options_from_env

        engine = _engine(
            db, lease_s=lease_s, llm=llm, pool=pool, workspaces=workspaces, sandbox_user=sandbox_user
        )
        engine.max_plan_steps = max_plan_steps
        if policy is not None:
            engine.policy = Policy.load(policy)
        config = uvicorn.Config(
            create_app(
                engine,
                auth=not no_auth,
                nats_url=nats,
                nats_options=nats_options_from_env() if nats else None,
                hosts=local_hosts(host, port, allowed_hosts or []),
                limits=limits,
            ),
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        await server.serve()
        return EXIT_OK

    _execute(session, body)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
) -> None:
    """Make an API key and print it, once: it is kept only as a hash."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db) as engine:
            record, token = await create_key(engine.store, role, name)
            await audit.record(engine.store, audit.cli_actor(), "key.create", record.id, role=record.role)
        if json_out:
            _emit_json({"id": record.id, "role": record.role, "name": record.name, "token": token})
        else:
            _out.print(Text(f"key {record.id} ({record.role}); it is shown this once:"))
            _out.print(token, markup=False, highlight=False)
        return EXIT_OK

    _execute(session, body)


@keys_app.command("list")
def keys_list(db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """The API keys (never their secrets)."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            keys = await engine.store.list_api_keys()
        if json_out:
            _emit_json([KeyView.of(k).model_dump() for k in keys])
            return EXIT_OK
        table = Table("id", "role", "name", "created", "revoked")
        for k in keys:
            table.add_row(k.id, k.role, k.name, _local(k.created_at), _local(k.revoked_at))
        _out.print(table)
        return EXIT_OK

    _execute(session, body)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id.")], db: DbOption = DEFAULT_DB
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    session = _Session(False, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            if not await engine.store.revoke_api_key(key_id, time.time()):
                raise UsageError(f"no live API key {key_id!r}")
            await audit.record(engine.store, audit.cli_actor(), "key.revoke", key_id)
        _out.print(Text(f"key {key_id} revoked"))
        return EXIT_OK

    _execute(session, body)
