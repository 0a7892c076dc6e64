"""The REST API: a thin layer on the Engine (``baton serve``).

Everything under ``/api/v1``; every endpoint but ``/health`` takes a bearer API key
(see :mod:`baton.api.auth`) unless auth was turned off for local use. Errors are JSON:
``{"code", "message"}`` (and ``problems`` for an invalid plan), with 400 for a body that
cannot be read, 401/403 for keys, 404, 409 for a state that does not allow the action,
422 for an invalid plan or parameters, 503 when the store cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import structlog
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton import audit
from baton.agents.request import GoalRequest
from baton.api.auth import ROLES, Role, authenticate, create_key
from baton.api.events import Key, history, parse_id
from baton.api.limits import Denials, Limits
from baton.api.local import YAML_TYPES, LocalOnly, allowed_hosts
from baton.engine import Engine, Event
from baton.errors import BatonError, Conflict, NotFound, PlanError, PolicyDenied, Problem
from baton.metrics import CONTENT_TYPE as METRICS_TYPE
from baton.metrics import Metrics
from baton.plan.reader import Refused, Unreadable, load_json, load_yaml
from baton.status import RunStatus
from baton.store import ApiKey
from baton.views import (
    AttemptView,
    AuditView,
    JobView,
    KeyView,
    ProgressView,
    RunDetail,
    RunView,
    StepView,
    iso,
    run_cost,
    run_detail,
)

log = structlog.get_logger("baton.api")

PREFIX = "/api/v1"
#: the last second of the year 9999: later times cannot be written as dates
LAST_TIME = 253402300799.0
#: who acts when auth is off (local use)
LOCAL = "local"
MAX_BODY = 10 * 1024 * 1024


class ErrorBody(BaseModel):
    code: str
    message: str
    problems: list[dict[str, str]] | None = None


class Links(BaseModel):
    self: str
    progress: str
    steps: str


class Submitted(BaseModel):
    id: str
    status: str
    #: False when the Idempotency-Key named a run submitted before
    created: bool
    links: Links


class StepDetail(StepView):
    attempt_history: list[AttemptView]


class WaveView(BaseModel):
    run: str
    wave: int
    steps: list[StepView]


class RunList(BaseModel):
    runs: list[RunView]
    limit: int
    offset: int


class JobRequest(BaseModel):
    task: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1000, le=1000)
    run_at: float | None = Field(default=None, ge=0, le=LAST_TIME, description="Unix time to start at")
    delay_s: float | None = Field(default=None, ge=0, le=366 * 86400)
    unique_key: str | None = Field(default=None, min_length=1, max_length=200)
    max_attempts: int = Field(default=3, ge=1, le=1000)
    queue: str = Field(default="default", min_length=1, max_length=100)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 86400)


class JobList(BaseModel):
    jobs: list[JobView]


class GoalSubmitted(Submitted):
    task_type: str
    template: str


class GoalStats(BaseModel):
    total_executions: int
    average_time_s: float | None
    success_rate: float | None
    template_usage: dict[str, int]
    task_types: dict[str, int]


class Health(BaseModel):
    status: Literal["ok", "unavailable", "failed"]
    store: str
    workers: int
    checked_at: str | None
    #: this process's worker: ok, or why it stopped (the status is then failed, 503)
    worker: str = "ok"


class KeyRequest(BaseModel):
    role: Literal["viewer", "operator", "admin"]
    name: str = Field(default="", max_length=200)


class NewKey(KeyView):
    #: the bearer token: shown this once, never stored
    token: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 421, 422, 429, 503)
}


def _json(model: BaseModel) -> Response:
    """A model as the JSON body of a 200, serialized by pydantic-core in one pass."""
    return Response(model.model_dump_json(), media_type="application/json")


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _status_of(exc: BatonError) -> int:
    """The error's own HTTP status; one an API client cannot cause is a bad request."""
    return 400 if exc.http_status == 500 else exc.http_status


def create_app(
    engine: Engine,
    *,
    auth: bool = True,
    nats_url: str | None = None,
    nats_options: dict[str, Any] | None = None,
    hosts: frozenset[str] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The API on ``engine`` (opened and closed with the app); with ``nats_url``, the same
    engine answers on NATS too (see :mod:`baton.api.nats`). Without ``auth``, only requests
    naming one of ``hosts`` (see :func:`baton.api.local.allowed_hosts`) from no other origin
    are answered. ``limits``: the rate limits (see :mod:`baton.api.limits`; defaults)."""
    limits = limits if limits is not None else Limits()
    denials = Denials(engine.store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.open()
        await engine.start_worker()
        nats = None
        if nats_url is not None:
            from baton.api.nats import NatsInterface  # nats-py only when asked for

            nats = NatsInterface(engine, nats_url, auth=auth, connect_options=nats_options)
            await nats.start()
        try:
            yield
        finally:
            if nats is not None:
                await nats.stop()
            if engine.worker is not None:
                await engine.worker.stop()
            await denials.flush(math.inf)  # the counts of the last bursts of denials
            await engine.close()

    app = FastAPI(
        title="baton",
        version="1",
        summary="Durable orchestration for AI-agent and LLM workloads",
        lifespan=lifespan,
        responses=ERRORS,
    )
    if not auth:
        app.add_middleware(LocalOnly, hosts=hosts if hosts is not None else allowed_hosts("127.0.0.1", 8000))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, "http_error", str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"where": ".".join(str(part) for part in e["loc"]), "message": str(e["msg"])}
            for e in exc.errors()
        ]
        return _error(422, "invalid_request", "the request is invalid", problems=problems)

    @app.exception_handler(BatonError)
    async def baton_error(_: Request, exc: BatonError) -> JSONResponse:
        if isinstance(exc, PlanError | PolicyDenied):
            return _error(_status_of(exc), exc.code, exc.message, problems=exc.to_dict().get("problems", []))
        return _error(_status_of(exc), exc.code, exc.message)

    def require(role: Role) -> Callable[..., Awaitable[ApiKey | None]]:
        async def check(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        ) -> ApiKey | None:
            request.state.actor = LOCAL
            # without keys (local use) callers get an operator's powers: a web page can
            # reach a loopback port, so no shell or python steps by default
            request.state.role = "operator"
            if not auth:
                return None
            refusal = None
            key = None
            if credentials is not None and credentials.credentials.strip():
                key = await authenticate(engine.store, credentials.credentials.strip())
            wait = limits.key(key.id) if key is not None else limits.address(_address(request))
            if wait is not None:
                who = f"key {key.id}" if key is not None else "this address without a valid key"
                message = f"too many requests from {who}: try again in {wait:g} s"
                refusal = _Refused(429, "rate_limited", message, {"Retry-After": f"{wait:g}"})
            elif credentials is None or not credentials.credentials.strip():
                refusal = _Refused(
                    401, "unauthenticated", "an API key is needed: Authorization: Bearer <key>"
                )
            elif key is None:
                refusal = _Refused(401, "unauthenticated", "the API key is unknown or revoked")
            elif Role[key.role] < role:
                refusal = _Refused(403, "forbidden", f"a {key.role} key cannot do this: it needs {role.name}")
            if refusal is not None:
                actor = f"key:{key.id}" if key is not None else "unauthenticated"
                reason = refusal.code if refusal.status == 429 else refusal.message
                route = getattr(request.scope.get("route"), "path", None)  # ids apart
                await denials.deny(actor, request.url.path, reason, place=route, method=request.method)
                raise refusal
            assert key is not None
            request.state.actor = f"key:{key.id}"
            request.state.role = key.role
            return key

        return check

    @app.exception_handler(_Refused)
    async def refused(_: Request, exc: _Refused) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        return response

    viewer = [Depends(require(Role.viewer))]
    operator = [Depends(require(Role.operator))]
    admin = [Depends(require(Role.admin))]

    # -- health ------------------------------------------------------------------------

    @app.get(f"{PREFIX}/health", response_model=Health, tags=["health"])
    async def health(response: Response) -> Health:
        """Whether the store answers, this process's worker runs, and how many workers are
        alive (no key needed)."""
        if engine.failure is not None:
            response.status_code = 503
            return Health(
                status="failed",
                store="unknown",
                workers=0,
                checked_at=iso(time.time()),
                worker=engine.failure.message,
            )
        try:
            workers = await engine.store.list_workers()
        except BatonError as exc:
            response.status_code = 503
            return Health(status="unavailable", store=exc.message, workers=0, checked_at=iso(time.time()))
        now = time.time()
        alive = [w for w in workers if w.expires_at >= now]
        return Health(status="ok", store="ok", workers=len(alive), checked_at=iso(now))

    # -- runs --------------------------------------------------------------------------

    @app.post(
        f"{PREFIX}/runs",
        status_code=202,
        response_model=Submitted,
        dependencies=operator,
        tags=["runs"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/yaml": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def submit_run(
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Submitted:
        """Start a run of the plan in the body (JSON, or YAML with a YAML content type).

        The same ``Idempotency-Key`` with the same plan gives the run made the first time;
        with another plan, 409.
        """
        plan = await _read_plan(request)
        handle = await engine.submit(
            plan, idempotency_key=idempotency_key, actor=request.state.actor, key_role=request.state.role
        )
        run = await engine.store.get_run(handle.run_id, with_plan=False)
        url = f"{PREFIX}/runs/{run.id}"
        response.headers["Location"] = url
        return Submitted(
            id=run.id,
            status=str(run.status),
            created=handle.created,
            links=Links(self=url, progress=f"{url}/progress", steps=f"{url}/steps"),
        )

    # -- goals -------------------------------------------------------------------------

    @app.post(
        f"{PREFIX}/goals",
        status_code=202,
        response_model=GoalSubmitted,
        dependencies=operator,
        tags=["goals"],
    )
    async def submit_goal(
        request: Request,
        response: Response,
        body: GoalRequest,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> GoalSubmitted:
        """Carry out a task given in words (baton.agents): classified, a template chosen by
        what was learned, its sub-tasks run as a run; follow it with the run's endpoints,
        and read its result at ``/goals/{id}``."""
        handle = await engine.agents.start(
            body.task,
            language=body.language,
            complexity=body.complexity,
            context=body.context_values(),
            idempotency_key=idempotency_key,
            actor=request.state.actor,
            key_role=request.state.role,
            decompose=body.decompose,
        )
        run = await engine.store.get_run(handle.run_id, with_plan=False)
        goal = await engine.store.get_goal(handle.run_id)
        assert goal is not None  # written with the run
        url = f"{PREFIX}/runs/{run.id}"
        response.headers["Location"] = f"{PREFIX}/goals/{run.id}"
        return GoalSubmitted(
            id=run.id,
            status=str(run.status),
            created=handle.created,
            links=Links(self=url, progress=f"{url}/progress", steps=f"{url}/steps"),
            task_type=goal.task_type,
            template=goal.template_id,
        )

    @app.get(f"{PREFIX}/goals/{{run_id}}", dependencies=viewer, tags=["goals"])
    async def get_goal(run_id: Annotated[str, _RunId]) -> dict[str, Any]:
        """A goal's result as it stands: the result, the template, model and rung that
        answered, and what it took."""
        run = await engine.store.get_run(run_id, with_plan=False)
        if await engine.store.get_goal(run.id) is None:
            raise NotFound(f"run {run.id} is not a goal's")
        return (await engine.agents.result(run.id)).to_dict()

    @app.get(f"{PREFIX}/stats", response_model=GoalStats, dependencies=viewer, tags=["goals"])
    async def goal_stats() -> GoalStats:
        """Goals carried out: how many, their average time, success rate, template usage."""
        return GoalStats.model_validate(await engine.agents.stats())

    @app.get(f"{PREFIX}/runs", response_model=RunList, dependencies=viewer, tags=["runs"])
    async def list_runs(
        status: RunStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000)] = 0,
    ) -> RunList:
        """Runs, newest first; filter by status; page with limit and offset."""
        runs = await engine.store.list_runs(limit + offset, status)
        return RunList(runs=[RunView.of(r) for r in runs[offset:]], limit=limit, offset=offset)

    @app.get(f"{PREFIX}/runs/{{run_id}}", response_model=RunDetail, dependencies=viewer, tags=["runs"])
    async def get_run(run_id: Annotated[str, _RunId]) -> Response:
        """A run with its steps (a unique prefix of its id will do)."""
        run = await engine.store.get_run(run_id, with_plan=False)
        steps = await engine.store.get_steps(run.id)
        # What pages and services poll: serialized in one pass, no model built to be taken
        # apart again.
        return Response(to_json(run_detail(run, steps)), media_type="application/json")

    @app.get(
        f"{PREFIX}/runs/{{run_id}}/progress", response_model=ProgressView, dependencies=viewer, tags=["runs"]
    )
    async def progress(run_id: Annotated[str, _RunId]) -> ProgressView:
        """Completion, counts by status, the waves under way, cost so far, ETA."""
        run = await engine.store.get_run(run_id, with_plan=False)
        steps = await engine.store.get_steps(run.id)
        cost = run_cost(await engine.store.get_attempts(run.id))
        return ProgressView.of(run, steps, cost, time.time())

    @app.get(
        f"{PREFIX}/runs/{{run_id}}/waves/{{wave}}",
        response_model=WaveView,
        dependencies=viewer,
        tags=["runs"],
    )
    async def wave(run_id: Annotated[str, _RunId], wave: Annotated[int, _Wave]) -> WaveView:
        """The steps of one wave (0: those that need nothing)."""
        run = await engine.store.get_run(run_id, with_plan=False)
        steps = [s for s in await engine.store.get_steps(run.id) if s.wave == wave]
        if not steps:
            raise NotFound(f"run {run.id} has no wave {wave}")
        return WaveView(run=run.id, wave=wave, steps=[StepView.of(s) for s in steps])

    @app.get(
        f"{PREFIX}/runs/{{run_id}}/steps/{{step_id}}",
        response_model=StepDetail,
        dependencies=viewer,
        tags=["runs"],
    )
    async def get_step(run_id: Annotated[str, _RunId], step_id: Annotated[str, _StepId]) -> StepDetail:
        """One step: its output or error, and every attempt."""
        run = await engine.store.get_run(run_id, with_plan=False)
        step = next((s for s in await engine.store.get_steps(run.id) if s.step_id == step_id), None)
        if step is None:
            raise NotFound(f"run {run.id} has no step {step_id!r}")
        attempts = [a for a in await engine.store.get_attempts(run.id) if a.step_id == step_id]
        return StepDetail(**StepView.fields(step), attempt_history=[AttemptView.of(a) for a in attempts])

    @app.post(
        f"{PREFIX}/runs/{{run_id}}/pause",
        response_model=RunView,
        dependencies=operator,
        tags=["runs"],
    )
    async def pause(request: Request, run_id: Annotated[str, _RunId]) -> RunView:
        """No new step starts; running ones finish (409 when the run is not running)."""
        run = await engine.pause(run_id, actor=request.state.actor)
        return RunView.of(run)

    @app.post(
        f"{PREFIX}/runs/{{run_id}}/resume", response_model=RunView, dependencies=operator, tags=["runs"]
    )
    async def resume(request: Request, run_id: Annotated[str, _RunId]) -> RunView:
        """Continue a paused run (409 when it ended, or live workers are running it)."""
        handle = await engine.resume(run_id, actor=request.state.actor)
        return RunView.of(await engine.store.get_run(handle.run_id, with_plan=False))

    @app.post(
        f"{PREFIX}/runs/{{run_id}}/cancel", response_model=RunView, dependencies=operator, tags=["runs"]
    )
    async def cancel(request: Request, run_id: Annotated[str, _RunId]) -> RunView:
        """Stop a run: nothing new starts, running steps are cancelled (409 when it ended)."""
        run = await engine.cancel(run_id, actor=request.state.actor)
        return RunView.of(run)

    @app.get(
        f"{PREFIX}/runs/{{run_id}}/events",
        dependencies=viewer,
        tags=["runs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}},
    )
    async def events(
        run_id: Annotated[str, _RunId],
        last_event_id: Annotated[str | None, Header(max_length=100)] = None,
    ) -> StreamingResponse:
        """The run's events as Server-Sent Events: all of them, or those after
        ``Last-Event-ID``, then live ones as they happen; the stream ends with the run."""
        after: Key | None = None
        if last_event_id is not None and last_event_id.strip():
            after = parse_id(last_event_id)
            if after is None:
                raise _Refused(400, "bad_event_id", f"Last-Event-ID {last_event_id!r} is not an event id")
        run = await engine.store.get_run(run_id, with_plan=False)
        return StreamingResponse(
            _stream(engine, run.id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    metrics = Metrics(engine)

    @app.get(
        f"{PREFIX}/metrics",
        dependencies=viewer,
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics: this process's steps, attempts, runs and model calls; the
        database's queue depth and live workers."""
        await metrics.refresh(engine.store, time.time())
        return Response(metrics.render(), media_type=METRICS_TYPE)

    # -- jobs --------------------------------------------------------------------------

    @app.post(f"{PREFIX}/jobs", status_code=202, response_model=JobView, dependencies=operator, tags=["jobs"])
    async def enqueue(request: Request, body: JobRequest) -> JobView:
        """Put a task call in the queue (a unique key taken returns the job there)."""
        job = await engine.enqueue(
            body.task,
            body.input,
            priority=body.priority,
            run_at=body.run_at,
            delay_s=body.delay_s,
            unique_key=body.unique_key,
            max_attempts=body.max_attempts,
            queue=body.queue,
            timeout_s=body.timeout_s,
            key_role=request.state.role,
            actor=request.state.actor,
        )
        if not job.duplicate:
            await audit.record(engine.store, request.state.actor, "job.enqueue", str(job.id), task=job.task)
        return JobView.of(job)

    @app.get(f"{PREFIX}/jobs", response_model=JobList, dependencies=viewer, tags=["jobs"])
    async def list_jobs(
        state: Literal[
            "available", "scheduled", "running", "retryable", "completed", "discarded", "cancelled"
        ]
        | None = None,
        queue: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> JobList:
        """Jobs, newest first."""
        jobs = await engine.store.list_jobs(state=state, queue=queue, limit=limit)
        return JobList(jobs=[JobView.of(j) for j in jobs])

    @app.get(f"{PREFIX}/jobs/{{job_id}}", response_model=JobView, dependencies=viewer, tags=["jobs"])
    async def get_job(job_id: Annotated[int, _JobId]) -> JobView:
        return JobView.of(await engine.store.get_job(job_id))

    @app.post(
        f"{PREFIX}/jobs/{{job_id}}/cancel", response_model=JobView, dependencies=operator, tags=["jobs"]
    )
    async def cancel_job(request: Request, job_id: Annotated[int, _JobId]) -> JobView:
        """Cancel a job that has not finished (409 otherwise)."""
        job = await engine.cancel_job(job_id)
        await audit.record(engine.store, request.state.actor, "job.cancel", str(job.id))
        return JobView.of(job)

    # -- keys --------------------------------------------------------------------------

    @app.get(f"{PREFIX}/keys", response_model=list[KeyView], dependencies=admin, tags=["keys"])
    async def list_keys() -> list[KeyView]:
        return [KeyView.of(k) for k in await engine.store.list_api_keys()]

    @app.post(f"{PREFIX}/keys", status_code=201, response_model=NewKey, dependencies=admin, tags=["keys"])
    async def new_key(request: Request, body: KeyRequest) -> NewKey:
        """Make a key; its token is in this answer and nowhere else."""
        record, token = await create_key(engine.store, body.role, body.name)
        await audit.record(engine.store, request.state.actor, "key.create", record.id, role=record.role)
        return NewKey(**KeyView.of(record).model_dump(), token=token)

    @app.post(f"{PREFIX}/keys/{{key_id}}/revoke", response_model=KeyView, dependencies=admin, tags=["keys"])
    async def revoke_key(request: Request, key_id: Annotated[str, _KeyId]) -> KeyView:
        revoked = await engine.store.revoke_api_key(key_id, time.time())
        key = next((k for k in await engine.store.list_api_keys() if k.id == key_id), None)
        if key is None:
            raise NotFound(f"no API key {key_id!r}")
        if not revoked:
            raise Conflict(f"API key {key_id} was revoked already")
        await audit.record(engine.store, request.state.actor, "key.revoke", key_id)
        return KeyView.of(key)

    @app.get(f"{PREFIX}/audit", response_model=list[AuditView], dependencies=admin, tags=["audit"])
    async def audit_trail(
        run: Annotated[str | None, Query(max_length=200, description="Only entries about this run")] = None,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AuditView]:
        """The audit trail, oldest first (page with ``after``: the last ``seq`` seen)."""
        entries = await engine.store.audit_entries(subject=run, after=after, limit=limit)
        return [AuditView.of(e) for e in entries]

    return app


_BEARER = HTTPBearer(auto_error=False, description="An API key (`baton keys create --role ...`).")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


_RunId = Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
_StepId = Path(min_length=1, max_length=200)
_Wave = Path(ge=0, le=100_000)
_JobId = Path(ge=1, le=2**62)
_KeyId = Path(min_length=1, max_length=40)


SSE_POLL_S = 0.5
#: one event of the stream: ``id`` orders it (send it back as Last-Event-ID), ``event`` is
#: its kind, ``data`` its JSON (kind, run_id, step_id, ts and the kind's own fields).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
SSE_KEEPALIVE_S = 15.0


async def _stream(engine: Engine, run_id: str, after: Key | None) -> AsyncIterator[bytes]:
    """What a run's event stream sends: the recorded events after ``after``, then each new
    one (woken by this process's events, else every SSE_POLL_S), until the run ended."""
    wake = asyncio.Event()

    def on_event(event: Event) -> None:
        if event.run_id == run_id:
            wake.set()

    unsubscribe = engine.subscribe(on_event)
    quiet_since = time.monotonic()
    try:
        while True:
            wake.clear()
            store = engine.store
            run = await store.get_run(run_id, with_plan=False)
            steps = await store.get_steps(run_id)
            attempts = await store.get_attempts(run_id)
            audit_entries = await store.audit_entries(subject=run.id)
            for stamped in history(run, steps, attempts, audit_entries):
                if after is not None and stamped.key <= after:
                    continue
                event = stamped.event
                data = {"kind": event.kind, "run_id": event.run_id, "step_id": event.step_id, **event.data}
                data["ts"] = iso(event.ts)
                yield f"id: {stamped.id}\nevent: {event.kind}\ndata: {json.dumps(data)}\n\n".encode()
                after = stamped.key
                quiet_since = time.monotonic()
            if run.status.terminal and run.running == 0:
                return
            if time.monotonic() - quiet_since >= SSE_KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            with contextlib.suppress(TimeoutError):  # (not wait_for: see Engine.wait)
                async with asyncio.timeout(SSE_POLL_S):
                    await wake.wait()
    finally:
        unsubscribe()


#: a body longer than this is parsed in a thread, so that the server goes on answering
PARSE_IN_THREAD = 64 * 1024


async def _read_plan(request: Request) -> Any:
    """The plan in a request body: JSON, or YAML when the content type says so.

    The body is read no further than MAX_BODY bytes (413 past that, at once when its
    Content-Length says so), and parsed within the bounds of :mod:`baton.plan.reader`
    (422 for what they refuse: aliases, duplicate keys, deep nesting, huge integers...)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 15 or int(declared) > MAX_BODY):
        raise _Refused(413, "too_large", f"a plan may have at most {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _Refused(413, "too_large", f"a plan may have at most {MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise _Refused(400, "empty_body", "the body must be a plan (JSON or YAML)")
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    read = load_yaml if kind in YAML_TYPES else load_json
    try:
        text = body.decode("utf-8")
        plan = await asyncio.to_thread(read, text) if len(body) > PARSE_IN_THREAD else read(text)
    except UnicodeDecodeError as exc:
        raise _Refused(400, "unreadable_body", f"the body is not UTF-8 text: {exc}") from None
    except Unreadable as exc:
        raise _Refused(400, "unreadable_body", f"the body is {exc}") from None
    except Refused as exc:
        raise PlanError([Problem("", str(exc))]) from None
    if not isinstance(plan, dict):
        raise PlanError([Problem("", "a plan must be a mapping with 'name' and 'steps'")])
    return plan


__all__ = ["ROLES", "create_app"]
