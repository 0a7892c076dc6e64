"""The NATS interface: request-reply on the Engine, and the engine's events on JetStream.

Subjects (``baton`` is the default prefix); every request and reply body is a JSON object:

- ``baton.runs.start``   ``{"plan": {...}, "idempotency_key"?}`` → ``{"id", "status", "created"}``
- ``baton.runs.get``     ``{"id"}`` → the run (``RunView``) with its ``steps`` (``StepView``)
- ``baton.runs.pause``, ``baton.runs.resume``, ``baton.runs.cancel``  ``{"id"}`` → the run
- ``baton.execute``      ``{"task", "input"?, "timeout_s"?, "retry"?, "validate"?, "budget"?,
  "role"?}`` → ``{"result", "method": "executor", "metrics": {"duration_ms"}}``, through
  ``Engine.execute``: the same executor, store and policies as a plan's steps.
- ``execution.request``  ``{"task", "language"?, "complexity"?, "context"?: {"workspace",
  "target_file", "context"}}`` → ``{"result", "template_used", "model_used", "method",
  "metrics": {"time_ms", "tokens_used", "cost_usd", "cache_hit", "quality", "success"},
  "run_id", "status", "task_type"}``: a goal (baton.agents) carried out and waited for, in
  the shapes of the system baton replaces, its refusals too: ``{"error": <code>,
  "message", "metrics": {"success": false}}``.

Every request carries an API key of ``baton keys create`` in its headers,
``Authorization: Bearer <key>``, with the roles of the REST API: ``runs.get`` needs a
viewer, the rest an operator, and what a plan or call may run is the policy's
(baton.policy) for the key's role. A request without a valid key is answered
``unauthenticated`` (``forbidden`` for too low a role), with a ``denied`` audit entry.
``auth=False`` (``--no-auth``) makes every caller an operator. How baton itself logs in to
the NATS server (user and password, token, nkey seed, creds file, TLS) is ``connect_options``;
a deployment where the NATS server enforces per-subject permissions is in the README.

A request that cannot be served gets ``{"error": {"code", "message", "problems"?}}`` and
the header ``Error-Code`` (a run's own ``error`` is a string or null, never an object), with
the codes of the REST API (``unreadable_body``, ``invalid_plan``, ``not_found``,
``conflict``...) and ``invalid_request`` (with ``problems``) for fields that do not fit.
Every reply carries a correlation id, in its body (``correlation_id``) and in the header
``Correlation-Id``: the request's ``correlation_id`` field, else its ``Correlation-Id`` or
``Nats-Msg-Id`` header, else a new one. The subjects are served in the queue group
``baton``, so several processes on one database share the requests.

Events go to the JetStream stream ``BATON_EVENTS`` (made if missing, on ``baton.events.>``)
under ``baton.events.<run_id>.<kind>``, the kind's dots kept as subject tokens:
``baton.events.<run_id>.run.completed``, ``baton.events.<run_id>.step.succeeded``; so
``baton.events.<run_id>.>`` is one run and ``baton.events.*.run.>`` every run's status.
Events of no run (standalone jobs, workers) use ``_`` for the run. Each message has the
header ``Nats-Msg-Id: <run_id>:<kind>:<step_id>:<ts>`` (for a job's event, ``job-<id>`` in
place of the step), which the stream de-duplicates on. The engine's subscriber only queues
events; a task publishes them, and drops them with a warning when NATS is away.

``baton nats`` runs this; ``baton serve`` can run it beside the HTTP server::

    interface = NatsInterface(engine, "nats://127.0.0.1:4222")
    await interface.start()   # connected, the stream there, subjects answered
    ...
    await interface.stop()    # in-flight requests answered, queued events flushed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baton.agents.request import GoalRequest
from baton.api.auth import Role, authenticate
from baton.api.limits import Denials
from baton.engine import Engine
from baton.engine.events import Event
from baton.errors import BatonError, PlanError, Problem, UnknownTask, UsageError
from baton.views import RunView, run_detail

log = structlog.get_logger("baton.nats")

#: goals, answered in the shapes of the system baton replaces (not under the prefix)
EXECUTION_SUBJECT = "execution.request"

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = "baton"
DEFAULT_STREAM = "BATON_EVENTS"
#: events waiting to be published; past this, new ones are dropped (with a warning)
EVENT_QUEUE_SIZE = 100_000
#: events published together (the stream acknowledges the last of them)
EVENT_BATCH = 512
ACK_TIMEOUT_S = 5.0
#: how long the publisher waits for more events once one arrives
EVENT_LINGER_S = 0.005
#: requests handled at once; more wait in the subscription's buffer
MAX_IN_FLIGHT = 1024
DROP_WARNING_EVERY_S = 5.0

_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_STREAM = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_NOT_A_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


#: who the audit trail says acted, for requests over NATS without keys (``auth=False``)
ACTOR = "nats"
#: what a NATS caller may run without keys (baton.policy): an operator's powers, so no
#: shell or python steps and no code-running validators
ROLE = "operator"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the audit trail's actor and the role of their key."""

    actor: str
    role: str


class Unauthenticated(BatonError):
    """The request has no valid API key: ``Authorization: Bearer <key>`` in its headers."""

    code = "unauthenticated"
    exit_code = 2
    http_status = 401


class Forbidden(BatonError):
    """The request's key has a role that does not allow this subject."""

    code = "forbidden"
    exit_code = 2
    http_status = 403


class NatsUnavailable(BatonError):
    """NATS cannot be reached, or its JetStream cannot take baton's events."""

    code = "nats_unavailable"
    exit_code = 2
    http_status = 503


class UnreadableRequest(UsageError):
    """The request is not a JSON object."""

    code = "unreadable_body"


class InvalidRequest(UsageError):
    """Fields of the request are missing or do not fit."""

    code = "invalid_request"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("invalid request: " + "; ".join(str(p) for p in self.problems))

    def to_dict(self) -> dict[str, object]:
        return {
            **super().to_dict(),
            "problems": [p.to_dict() for p in self.problems],
        }


# -- requests ----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    correlation_id: str | None = Field(default=None, min_length=1, max_length=200)


class StartRequest(_Request):
    plan: dict[str, Any]
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class RunRequest(_Request):
    id: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]


class ExecuteRequest(_Request):
    """One task call; the policy fields are a plan step's (checked as the step is)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_s: Any = None
    retry: Any = None
    validate_: Any = Field(default=None, alias="validate")
    budget: Any = None
    role: Any = None

    def policy(self) -> dict[str, Any]:
        fields = {"timeout_s": self.timeout_s, "retry": self.retry, "validate": self.validate_}
        fields.update(budget=self.budget, role=self.role)
        return {k: v for k, v in fields.items() if v is not None}


class ExecutionRequest(GoalRequest):
    """A goal: a task in words (baton.agents), in the shape of the system baton replaces."""

    correlation_id: str | None = Field(default=None, min_length=1, max_length=200)


def _problems(exc: ValidationError) -> list[Problem]:
    return [
        Problem(".".join(str(part) for part in error["loc"]), error["msg"])
        for error in exc.errors(include_url=False)
    ]


def _call_problems(problems: Sequence[Problem]) -> list[Problem]:
    """A plan's problems about the one step ``Engine.execute`` makes, told as the request's."""
    return [
        Problem(
            p.where.replace("steps[0].with", "input").removeprefix("steps[0]."),
            p.message.removesuffix(" in step 'call'"),
        )
        for p in problems
    ]


def _parse(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableRequest(f"the request is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UnreadableRequest(f"the request must be a JSON object, not {type(body).__name__}")
    return body


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if key.lower() == name.lower() and value and len(value) <= 200:
            return value
    return None


def _correlation_id(body: Mapping[str, Any] | None, headers: Mapping[str, str] | None) -> str | None:
    given = (body or {}).get("correlation_id")
    if isinstance(given, str) and 0 < len(given) <= 200:
        return given
    return _header(headers, "Correlation-Id") or _header(headers, "Nats-Msg-Id")


# -- events ------------------------------------------------------------------------------------


def _token(text: str) -> str:
    return _NOT_A_TOKEN.sub("_", text) or "_"


def event_subject(prefix: str, event: Event) -> str:
    """``<prefix>.events.<run_id>.<kind tokens>`` (``_`` for an event of no run)."""
    kind = ".".join(_token(part) for part in event.kind.split("."))
    return f"{prefix}.events.{_token(event.run_id) if event.run_id else '_'}.{kind}"


def event_msg_id(event: Event) -> str:
    """What the stream de-duplicates on: the same fact published twice is stored once."""
    where = event.step_id or (f"job-{event.data['job']}" if event.data.get("job") else "")
    return f"{event.run_id or '_'}:{event.kind}:{where}:{event.ts!r}"


def event_json(event: Event) -> bytes:
    doc = {
        "kind": event.kind,
        "run_id": event.run_id or None,
        "step_id": event.step_id,
        "data": event.data,
        "ts": event.ts,
    }
    return json.dumps(doc, default=str, ensure_ascii=False).encode()


def connect_options(
    *,
    creds: str | None = None,
    nkey_seed: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> dict[str, Any]:
    """nats-py's connect options for how baton logs in to the NATS server: a creds file
    (JWT and nkey), an nkey seed file, TLS (a CA to trust, a client certificate). A user and
    password or a token go in the URL: ``nats://user:password@host:4222``."""
    options: dict[str, Any] = {}
    if creds:
        options["user_credentials"] = creds
    if nkey_seed:
        options["nkeys_seed"] = nkey_seed
    if tls_ca or tls_cert:
        context = ssl.create_default_context(cafile=tls_ca)
        if tls_cert:
            context.load_cert_chain(tls_cert, tls_key)
        options["tls"] = context
    for name in ("user_credentials", "nkeys_seed"):
        if name in options and not Path(options[name]).is_file():
            raise UsageError(f"NATS {name.replace('_', ' ')}: no file at {options[name]}")
    return options


def options_from_env() -> dict[str, Any]:
    """``connect_options`` from BATON_NATS_CREDS, _NKEY, _TLS_CA, _TLS_CERT, _TLS_KEY (what
    ``baton serve --nats`` logs in with; ``baton nats`` takes them as flags too)."""
    env = os.environ.get
    return connect_options(
        creds=env("BATON_NATS_CREDS"),
        nkey_seed=env("BATON_NATS_NKEY"),
        tls_ca=env("BATON_NATS_TLS_CA"),
        tls_cert=env("BATON_NATS_TLS_CERT"),
        tls_key=env("BATON_NATS_TLS_KEY"),
    )


# -- the interface -----------------------------------------------------------------------------

Handler = Callable[[dict[str, Any], Caller], Awaitable[dict[str, Any]]]


class NatsInterface:
    """Serves the Engine on NATS and publishes its events to JetStream.

    It does not own the engine: open it (and start its worker) before, close it after.
    """

    def __init__(
        self,
        engine: Engine,
        url: str = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        stream: str = DEFAULT_STREAM,
        queue_group: str | None = "baton",
        stream_max_age_s: float = 7 * 86400,
        connect_timeout_s: float = 5.0,
        auth: bool = True,
        connect_options: Mapping[str, Any] | None = None,
        execution_subject: str = EXECUTION_SUBJECT,
    ) -> None:
        if not _PREFIX.match(prefix) or not _PREFIX.match(execution_subject):
            raise UsageError(f"NATS subject prefix {prefix!r}: tokens of letters, digits, _ and - only")
        if not _STREAM.match(stream):
            raise UsageError(f"JetStream stream name {stream!r}: letters, digits, _ and - only")
        self.engine = engine
        self.url = url
        self.prefix = prefix
        self.stream = stream
        self.queue_group = queue_group
        self.stream_max_age_s = stream_max_age_s
        self.connect_timeout_s = connect_timeout_s
        #: every request carries an API key (``Authorization: Bearer <key>`` header), with
        #: the same roles as REST; without, every caller is an operator
        self.auth = auth
        #: how this client authenticates to the NATS server (nats-py's connect options:
        #: user, password, token, user_credentials, nkeys_seed, tls)
        self.connect_options = dict(connect_options or {})
        self._denials = Denials(engine.store)
        #: events dropped (NATS away, no acknowledgement, queue full) since start
        self.events_dropped = 0
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        #: the role each subject needs of a request's key
        self._needs = {f"{prefix}.runs.get": Role.viewer}
        self._handlers: dict[str, Handler] = {
            f"{prefix}.runs.start": self._start_run,
            f"{prefix}.runs.get": self._get_run,
            f"{prefix}.runs.pause": self._pause,
            f"{prefix}.runs.resume": self._resume,
            f"{prefix}.runs.cancel": self._cancel,
            f"{prefix}.execute": self._execute,
            execution_subject: self._execution,
        }
        #: the subject of goals, answered in the shapes of the system baton replaces
        self.execution_subject = execution_subject
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._publisher: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._unreported = 0
        self._drop_reason = ""
        self._reported_at = 0.0
        self._connect_error: Exception | None = None

    @property
    def subjects(self) -> list[str]:
        return list(self._handlers)

    @property
    def events_subject(self) -> str:
        return f"{self.prefix}.events.>"

    async def __aenter__(self) -> NatsInterface:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, make the event stream if it is missing, and answer the subjects.

        NatsUnavailable when the server cannot be reached within ``connect_timeout_s`` or
        has no JetStream; once started, the client reconnects by itself.
        """
        if self._nc is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        nc = await self._connect()
        try:
            js = nc.jetstream()
            await self._ensure_stream(js)
            self._nc, self._js = nc, js
            self._publisher = asyncio.create_task(self._publish_events(), name="baton-nats-events")
            self._unsubscribe = self.engine.subscribe(self._on_event)
            for subject in self._handlers:
                self._subs.append(
                    await nc.subscribe(subject, queue=self.queue_group or "", cb=self._dispatch)
                )
            await nc.flush(timeout=max(1, int(self.connect_timeout_s)))
        except BaseException:
            await self._teardown(nc)
            raise
        log.info("nats interface started", url=self.url, prefix=self.prefix, stream=self.stream)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop answering, give in-flight requests ``grace_s`` to be answered, publish the
        events queued so far, and disconnect."""
        nc = self._nc
        if nc is None:
            return
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in late:
                task.cancel()  # answered "unavailable" on the way out
            if late:
                await asyncio.wait(late, timeout=2.0)
        await self._teardown(nc)
        await self._denials.flush(math.inf)  # the counts of the last bursts of denials
        log.info("nats interface stopped", url=self.url, events_dropped=self.events_dropped)

    async def _teardown(self, nc: NatsClient) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._publisher is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(None)  # flush what is queued, then end
            done, _ = await asyncio.wait({self._publisher}, timeout=ACK_TIMEOUT_S + 1.0)
            if not done:
                self._publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._publisher
            self._publisher = None
        self._report_drops(force=True)
        self._nc = self._js = None  # from here, a disconnection is ours
        with contextlib.suppress(Exception):
            await nc.close()

    async def _connect(self) -> NatsClient:
        nc = NatsClient()
        self._connect_error = None
        try:
            await asyncio.wait_for(
                nc.connect(
                    self.url,
                    name="baton",
                    connect_timeout=max(1, int(self.connect_timeout_s)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self.connect_options,
                ),
                self.connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            cause = self._connect_error or exc
            raise NatsUnavailable(
                f"cannot connect to NATS at {self.url}: {type(cause).__name__}: {cause}".rstrip(": ")
            ) from None
        return nc

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            try:
                info = await js.stream_info(self.stream)
            except NotFoundError:
                await js.add_stream(
                    StreamConfig(
                        name=self.stream,
                        subjects=[self.events_subject],
                        max_age=self.stream_max_age_s,
                        duplicate_window=120.0,
                    )
                )
                log.info("jetstream stream made", stream=self.stream, subjects=self.events_subject)
                return
        except (TimeoutError, nats.errors.Error) as exc:
            raise NatsUnavailable(
                f"JetStream at {self.url} cannot take baton's events (is it enabled? nats-server -js): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        subjects = info.config.subjects or []
        if self.events_subject not in subjects and f"{self.prefix}.>" not in subjects and ">" not in subjects:
            raise NatsUnavailable(
                f"the JetStream stream {self.stream} takes {', '.join(subjects) or 'no subjects'}, not "
                f"{self.events_subject}: name another stream (--stream) or another prefix"
            )

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None:  # connecting: told once, in start's error
            self._connect_error = exc
            return
        log.warning("nats error", url=self.url, error=f"{type(exc).__name__}: {exc}")

    async def _on_disconnected(self) -> None:
        if self._nc is not None:
            log.warning("nats disconnected; reconnecting (events are dropped meanwhile)", url=self.url)

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected", url=self.url)

    # -- requests ----------------------------------------------------------------------------

    async def _dispatch(self, msg: Msg) -> None:
        # The subscription awaits this callback before the next message: hand each request
        # to its own task so a long execute does not hold up a quick get.
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        handler = self._handlers[msg.subject]
        cid = _correlation_id(None, msg.headers)
        error: dict[str, Any] | None = None
        reply: dict[str, Any] = {}
        try:
            body = _parse(msg.data)
            cid = _correlation_id(body, msg.headers)
            caller = await self._caller(msg)
            reply = await handler(body, caller)
        except BatonError as exc:
            error = exc.to_dict()
        except ValidationError as exc:
            error = InvalidRequest(_problems(exc)).to_dict()
        except asyncio.CancelledError:
            message = "baton is shutting down; the request may or may not have taken effect"
            await self._reply(msg, None, {"code": "unavailable", "message": message}, cid)
            raise
        except Exception as exc:
            log.exception("nats request failed", subject=msg.subject, correlation_id=cid)
            error = {"code": "internal", "message": f"internal: {type(exc).__name__}: {exc}"}
        if error is not None:
            log.info("nats request refused", subject=msg.subject, code=error["code"], correlation_id=cid)
        await self._reply(msg, reply, error, cid)

    async def _reply(
        self, msg: Msg, reply: dict[str, Any] | None, error: dict[str, Any] | None, cid: str | None
    ) -> None:
        """Send ``reply``, or ``error`` as ``{"error": ...}`` with the header Error-Code."""
        cid = cid or uuid.uuid4().hex
        if not msg.reply:
            log.warning("nats request without a reply subject", subject=msg.subject, correlation_id=cid)
            return
        nc = self._nc
        if nc is None:
            return
        try:
            if error is not None and msg.subject == self.execution_subject:
                # the shape execution.request callers know: a code, a message, no success
                doc = {"error": error["code"], "message": error["message"], "metrics": {"success": False}}
                if "problems" in error:
                    doc["problems"] = error["problems"]
            else:
                doc = {"error": error} if error is not None else (reply or {})
            payload = json.dumps({**doc, "correlation_id": cid}, default=str, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            error = {"code": "internal", "message": f"internal: the reply is not JSON: {exc}"}
            payload = json.dumps({"error": error, "correlation_id": cid}).encode()
        if len(payload) > nc.max_payload:
            message = f"the reply has {len(payload)} bytes; this NATS server takes at most {nc.max_payload}"
            error = {"code": "too_large", "message": message}
            payload = json.dumps({"error": error, "correlation_id": cid}).encode()
        headers = {"Correlation-Id": cid}
        if error is not None:
            headers["Error-Code"] = str(error["code"])
        try:
            await nc.publish(msg.reply, payload, headers=headers)
        except Exception as exc:
            log.warning("nats reply not sent", subject=msg.subject, correlation_id=cid, error=str(exc))

    async def _caller(self, msg: Msg) -> Caller:
        """Who sent ``msg``; Unauthenticated or Forbidden (and a ``denied`` audit entry)
        when its key is missing, unknown, revoked or of too low a role for the subject."""
        if not self.auth:
            return Caller(ACTOR, ROLE)
        needs = self._needs.get(msg.subject, Role.operator)
        scheme, _, token = (_header(msg.headers, "Authorization") or "").partition(" ")
        key = await authenticate(self.engine.store, token.strip()) if scheme.lower() == "bearer" else None
        refusal: BatonError | None = None
        if key is None:
            refusal = Unauthenticated(
                "an API key is needed: Authorization: Bearer <key>, in the request's headers"
                if not token
                else "the API key is unknown or revoked"
            )
        elif Role[key.role] < needs:
            refusal = Forbidden(f"a {key.role} key cannot do this: it needs {needs.name}")
        if refusal is not None:
            actor = f"key:{key.id}" if key is not None else "unauthenticated"
            await self._denials.deny(actor, msg.subject, refusal.message)  # a burst: one entry
            raise refusal
        assert key is not None
        return Caller(f"key:{key.id}", key.role)

    async def _start_run(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        request = StartRequest.model_validate(body)
        handle = await self.engine.submit(
            request.plan, idempotency_key=request.idempotency_key, actor=caller.actor, key_role=caller.role
        )
        run = await self.engine.store.get_run(handle.run_id, with_plan=False)
        return {"id": run.id, "status": str(run.status), "created": handle.created}

    async def _get_run(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        request = RunRequest.model_validate(body)
        await self.engine.open()
        run = await self.engine.store.get_run(request.id, with_plan=False)
        steps = await self.engine.store.get_steps(run.id)
        return run_detail(run, steps)

    async def _pause(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        run = await self.engine.pause(RunRequest.model_validate(body).id, actor=caller.actor)
        return RunView.of(run).model_dump()

    async def _resume(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        handle = await self.engine.resume(RunRequest.model_validate(body).id, actor=caller.actor)
        return RunView.of(await self.engine.store.get_run(handle.run_id, with_plan=False)).model_dump()

    async def _cancel(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        run = await self.engine.cancel(RunRequest.model_validate(body).id, actor=caller.actor)
        return RunView.of(run).model_dump()

    async def _execute(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        request = ExecuteRequest.model_validate(body)
        registry = self.engine.registry
        registry.refresh()
        if request.task not in registry:
            known = ", ".join(registry.names())
            raise UnknownTask(f"unknown task {request.task!r} (known: {known})")
        started = time.perf_counter()
        try:
            result = await self.engine.execute(
                request.task, request.input, key_role=caller.role, actor=caller.actor, **request.policy()
            )
        except PlanError as exc:
            raise InvalidRequest(_call_problems(exc.problems)) from None
        duration_ms = (time.perf_counter() - started) * 1000
        return {"result": result, "method": "executor", "metrics": {"duration_ms": round(duration_ms, 3)}}

    async def _execution(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        request = ExecutionRequest.model_validate(body)
        result = await self.engine.agents.achieve(
            request.task,
            language=request.language,
            complexity=request.complexity,
            context=request.context_values(),
            actor=caller.actor,
            key_role=caller.role,
            decompose=request.decompose,
        )
        log.info(
            "goal done",
            subject=self.execution_subject,
            run_id=result.run_id,
            template=result.template_used,
            success=result.metrics["success"],
            correlation_id=request.correlation_id,
        )
        reply = result.to_dict()
        if reply["error"] is None:
            del reply["error"]  # an "error" key is how a refused request reads
        return reply

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        # Called inside the engine, often in the executor's loop: queue it, nothing more.
        if threading.get_ident() != self._thread and self._loop is not None:
            self._loop.call_soon_threadsafe(self._enqueue, event)
        else:
            self._enqueue(event)

    def _enqueue(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped(1, "the event queue is full")

    async def _publish_events(self) -> None:
        while True:
            first = await self._events.get()
            if first is not None and self._events.qsize() < EVENT_BATCH:
                # A run's events come in bursts (a step starts and ends within a millisecond):
                # wait for the rest, and publish after the request that caused them is answered.
                await asyncio.sleep(EVENT_LINGER_S)
            batch: list[Event] = []
            ending = first is None
            if first is not None:
                batch.append(first)
            while len(batch) < EVENT_BATCH and not self._events.empty():
                event = self._events.get_nowait()
                if event is None:
                    ending = True
                    break
                batch.append(event)
            if batch:
                await self._publish(batch)
            if ending:
                return

    async def _publish(self, batch: list[Event]) -> None:
        """Publish a batch in order; only its last message waits for the stream's ack.

        The server handles one connection's messages in order, so the stream acknowledging
        the last says it was there and took the batch. An ack per message (five for one
        ``execute``) made ``execute`` round trips twice as slow: the acks are handled on
        this event loop, between the requests.
        """
        nc, js = self._nc, self._js
        if nc is None or js is None or not nc.is_connected:
            self._dropped(len(batch), "NATS is not connected")
            return
        *rest, last = batch
        try:
            for event in rest:
                headers = {"Nats-Msg-Id": event_msg_id(event)}
                await nc.publish(event_subject(self.prefix, event), event_json(event), headers=headers)
            headers = {"Nats-Msg-Id": event_msg_id(last)}
            ack = await js.publish_async(
                event_subject(self.prefix, last), event_json(last), wait_stall=ACK_TIMEOUT_S, headers=headers
            )
        except Exception as exc:
            self._dropped(len(batch), f"{type(exc).__name__}: {exc}")
            return
        try:
            await asyncio.wait_for(ack, ACK_TIMEOUT_S)
        except Exception as exc:
            reason = "no acknowledgement in time" if isinstance(exc, TimeoutError) else str(exc)
            self._dropped(len(batch), f"the stream {self.stream} did not acknowledge them: {reason}")

    def _dropped(self, count: int, reason: str) -> None:
        self.events_dropped += count
        self._unreported += count
        self._drop_reason = reason
        self._report_drops()

    def _report_drops(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._unreported and (force or now - self._reported_at >= DROP_WARNING_EVERY_S):
            log.warning(
                "run events not published to JetStream",
                dropped=self._unreported,
                reason=self._drop_reason,
                stream=self.stream,
            )
            self._unreported = 0
            self._reported_at = now


async def serve_nats(
    engine: Engine,
    url: str = DEFAULT_URL,
    *,
    prefix: str = DEFAULT_PREFIX,
    stream: str = DEFAULT_STREAM,
    started: asyncio.Event | None = None,
    auth: bool = True,
) -> None:
    """Run the interface until cancelled (e.g. as a task beside ``baton serve``'s HTTP server)."""
    async with NatsInterface(engine, url, prefix=prefix, stream=stream, auth=auth):
        if started is not None:
            started.set()
        await asyncio.Future()  # until cancelled


__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_STREAM",
    "DEFAULT_URL",
    "InvalidRequest",
    "NatsInterface",
    "NatsUnavailable",
    "event_msg_id",
    "event_subject",
    "serve_nats",
]
