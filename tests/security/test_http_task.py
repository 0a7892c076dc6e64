"""The ``http`` task: the address policy, pinning, redirects, limits, and the task in a plan.

Every server here listens on loopback (127.0.0.1, 127.0.0.2). Refusals are shown to happen
before any connection: the servers count the connections they accept, and every connection
the task's network backend opens is recorded (``connects``). No test reaches another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpcore
import pytest

from baton import Engine, Registry, RunStatus, StepStatus, TaskContext
from baton.errors import PlanError, TaskFailed, UsageError
from baton.tasks.http import ALLOW_ENV, AddressPolicy, AddressRefused, fetch, http_task, refusal

Route = Callable[["_Handler", bytes], None]


class Server(ThreadingHTTPServer):
    """A loopback HTTP server that records what reaches it: connections and requests."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), _Handler)
        self.accepts = 0
        self.requests: list[dict[str, Any]] = []
        self.routes: dict[str, Route] = {}
        self.release = threading.Event()  # slow routes wait for it (set at the end)
        self.server_names: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        self.accepts += 1
        return conn, address

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/", host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.server_address[0]}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.partition("?")[0]
        self.server.requests.append(
            {"method": self.command, "path": path, "headers": dict(self.headers.items()), "body": body}
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped reading
            self.server.routes.get(path, echo)(self, body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


def respond(
    h: _Handler, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True
) -> None:
    h.send_response(status)
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    if length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def echo(h: _Handler, body: bytes) -> None:
    seen = {"method": h.command, "path": h.path, "headers": dict(h.headers.items()), "body": body.decode()}
    respond(h, 200, json.dumps(seen).encode(), {"Content-Type": "application/json", "X-Reply": "yes"})


def redirect(to: str, status: int = 302) -> Route:
    return lambda h, body: respond(h, status, b"", {"Location": to})


def _serve(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve(Server("127.0.0.1"))


@pytest.fixture
def server2() -> Iterator[Server]:
    """Another loopback address: a redirect target the allow-list may or may not name."""
    yield from _serve(Server("127.0.0.2"))


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connection the task opens (the network backend under the pinning one)."""
    opened: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def connect_tcp(self: httpcore.AnyIOBackend, host: str, port: int, **kwargs: Any) -> Any:
        opened.append((host, port))
        return await real(self, host, port, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return opened


@pytest.fixture(autouse=True)
def _no_env_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)


def fake_dns(monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> list[str]:
    """``name`` resolves to each of ``answers`` in turn (the last one from then on), as the
    system resolver: whoever asks, the task or anything under it. Returns the lookups made."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real(host, port, *args, **kwargs)
        address = answers[min(len(lookups), len(answers) - 1)]
        lookups.append(address)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


async def call(allow: list[str] | None = None, ctx: TaskContext | None = None, **inputs: Any) -> Any:
    task = http_task(allow if allow is not None else [])
    assert task.check_inputs(inputs) == []
    return await task.invoke(inputs, ctx or TaskContext("run", "step", 1))


# -- the address policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.1.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "metadata"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
    ],
)
def test_refusal_names_why_an_address_is_not_public(address: str, reason: str) -> None:
    assert refusal(ip_address(address)) == f"{reason} address"


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ip_address(address)) is None


async def test_the_allow_list_names_hosts_domains_addresses_and_networks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = AddressPolicy.of("localhost, *.corp.example,10.1.0.0/16 ,[::1], 127.0.0.2")
    assert policy.allows_host("LOCALHOST.") and policy.allows_host("a.b.corp.example")
    assert not policy.allows_host("corp.example") and not policy.allows_host("evilcorp.example")
    assert policy.allows_address(ip_address("10.1.2.3")) and not policy.allows_address(ip_address("10.2.0.1"))
    assert policy.allows_address(ip_address("::1")) and policy.allows_address(ip_address("127.0.0.2"))
    fake_dns(monkeypatch, "db.corp.example", ["10.9.9.9"])
    assert await policy.addresses("db.corp.example", 80) == [ip_address("10.9.9.9")]
    for bad in ["http://x", "a b", "*foo.com", "-x.com", "*.", "10.0.0.0/33"]:
        with pytest.raises(UsageError, match="allow-list"):
            AddressPolicy.of([bad])


async def test_a_metadata_address_is_reached_only_when_named_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, "metadata.google.internal", ["169.254.169.254"])
    for entries in (["169.254.0.0/16"], ["*.google.internal"], ["metadata.google.internal"]):
        with pytest.raises(AddressRefused, match="metadata address"):
            await AddressPolicy.of(entries).addresses("metadata.google.internal", 80)
    named = AddressPolicy.of(["169.254.169.254"])
    assert await named.addresses("metadata.google.internal", 80) == [ip_address("169.254.169.254")]


async def test_one_refused_address_refuses_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "mixed.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("8.8.8.8", "10.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(AddressRefused, match=r"mixed\.test \(10\.0\.0\.1\): private address"):
        await AddressPolicy().addresses("mixed.test", 80)


# -- refused before any connection -------------------------------------------------------------


async def test_loopback_is_refused_by_default_before_connecting(
    server: Server, connects: list[tuple[str, int]]
) -> None:
    ctx = TaskContext("run", "step", 1)
    with pytest.raises(AddressRefused, match=r"refused 127\.0\.0\.1: loopback address"):
        await call(None, ctx, url=server.url("/"))
    assert connects == []
    assert server.accepts == 0 and server.requests == []
    assert ctx.details["hops"] == []


SSRF = [
    ("127.0.0.1", "loopback"),
    ("localhost", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("[::1]", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "metadata"),
    ("[fd00:ec2::254]", "metadata"),
    ("100.100.100.200", "metadata"),
    ("[::ffff:127.0.0.1]", "loopback"),
    ("2130706433", "loopback"),  # 127.0.0.1 as one decimal number
    ("0x7f000001", "loopback"),  # in hex
    ("017700000001", "loopback"),  # in octal
    ("127.1", "loopback"),  # the short form
]


@pytest.mark.parametrize(("host", "reason"), SSRF)
async def test_the_ssrf_corpus_is_refused_before_connecting(
    host: str, reason: str, server: Server, connects: list[tuple[str, int]]
) -> None:
    # the loopback server's port: any connection to 127.0.0.1 would be one it accepts
    with pytest.raises(AddressRefused, match=f"{reason} address"):
        await call(None, url=server.url("/", host=host))
    assert connects == []
    assert server.accepts == 0 and server.requests == []


async def test_the_default_task_reads_the_allow_list_from_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = Registry.default().get("http")
    ctx = TaskContext("run", "step", 1)
    with pytest.raises(AddressRefused):
        await task.invoke({"url": server.url("/")}, ctx)
    monkeypatch.setenv(ALLOW_ENV, "example.org,127.0.0.1")
    assert (await task.invoke({"url": server.url("/")}, ctx))["status"] == 200
    monkeypatch.setenv(ALLOW_ENV, "not a host")
    assert any(ALLOW_ENV in p for p in task.check_inputs({"url": server.url("/")}))
    assert task.needs == frozenset({"http"})


# -- requests that are allowed -----------------------------------------------------------------


async def test_get_and_post_round_trip(server: Server, connects: list[tuple[str, int]]) -> None:
    allow = ["127.0.0.1"]
    ctx = TaskContext("run", "step", 1)
    got = await call(allow, ctx, url=server.url("/hello?x=1"), headers={"X-Token": "t1"})
    assert got["status"] == 200 and got["url"] == server.url("/hello?x=1")
    assert got["headers"]["x-reply"] == "yes" and got["headers"]["content-type"] == "application/json"
    assert got["body_encoding"] == "text" and json.loads(got["body"]) == got["json"]
    assert got["json"]["method"] == "GET" and got["json"]["path"] == "/hello?x=1"
    assert got["json"]["headers"]["X-Token"] == "t1"
    assert got["json"]["headers"]["Host"] == f"127.0.0.1:{server.port}"
    assert ctx.details["hops"] == [
        {"url": server.url("/hello?x=1"), "address": f"127.0.0.1:{server.port}", "status": 200}
    ]

    got = await call(allow, method="post", url=server.url("/items"), json={"name": "a", "n": [1, 2]})
    assert got["json"]["method"] == "POST"
    assert json.loads(got["json"]["body"]) == {"name": "a", "n": [1, 2]}
    assert got["json"]["headers"]["Content-Type"] == "application/json"

    got = await call(allow, method="PUT", url=server.url("/raw"), body="plain words")
    assert got["json"]["body"] == "plain words"
    assert connects == [("127.0.0.1", server.port)] * 3


async def test_statuses_and_bodies(server: Server) -> None:
    allow = ["127.0.0.1"]
    server.routes["/missing"] = lambda h, b: respond(
        h, 404, b"no such thing" * 50, {"Content-Type": "text/plain"}
    )
    server.routes["/made"] = lambda h, b: respond(h, 201, b"", {})
    server.routes["/bytes"] = lambda h, b: respond(h, 200, b"\x00\xff\x10", {"Content-Type": "image/png"})
    server.routes["/broken"] = lambda h, b: respond(h, 200, b"{nope", {"Content-Type": "application/json"})

    with pytest.raises(TaskFailed, match=r"answered 404 Not Found: 'no such thingno such thing") as caught:
        await call(allow, url=server.url("/missing"))
    assert len(caught.value.message) < 400  # a preview, not the body
    got = await call(allow, url=server.url("/missing"), expect_status=[404])
    assert got["status"] == 404 and got["body"].startswith("no such thing")
    assert (await call(allow, url=server.url("/made")))["status"] == 201
    with pytest.raises(TaskFailed, match="answered 201"):
        await call(allow, url=server.url("/made"), expect_status=[200])
    got = await call(allow, url=server.url("/bytes"))
    assert got["body_encoding"] == "base64" and got["body"] == "AP8Q" and got["json"] is None
    got = await call(allow, url=server.url("/broken"))
    assert got["body"] == "{nope" and got["json"] is None
    got = await call(allow, method="HEAD", url=server.url("/hello"))
    assert got["status"] == 200 and got["body"] == ""


async def test_inputs_are_checked_before_the_run_and_again_when_it_runs() -> None:
    task = http_task([])

    def problems(**inputs: Any) -> list[str]:
        return task.check_inputs({"url": "https://example.org/", **inputs})

    assert problems() == []
    assert problems(url="${{ steps.a.output.url }}", timeout_s="${{ steps.a.output.t }}") == []
    assert any("method must be one of" in p for p in problems(method="TRACE"))
    assert any("http or https" in p for p in problems(url="file:///etc/passwd"))
    assert any("http or https" in p for p in problems(url="gopher://x/"))
    assert any("not both" in p for p in problems(json={"a": 1}, body="x"))
    assert any("timeout_s" in p for p in problems(timeout_s=301))
    assert any("max_bytes" in p for p in problems(max_bytes=0))
    assert any("may not set Host" in p for p in problems(headers={"Host": "internal"}))
    assert any("expect_status" in p for p in problems(expect_status=[200, 1000]))
    assert any("unknown input 'data'" in p for p in problems(data="x"))
    # a reference may resolve to anything: the values are checked again at run time
    with pytest.raises(TaskFailed, match="http or https"):
        await fetch(AddressPolicy(), url="file:///etc/passwd")
    with pytest.raises(TaskFailed, match="url must be a string"):
        await task.invoke({"url": None}, TaskContext("run", "step", 1))


# -- redirects ---------------------------------------------------------------------------------


async def test_a_redirect_to_a_refused_address_is_refused_at_the_hop(
    server: Server, server2: Server, connects: list[tuple[str, int]]
) -> None:
    server.routes["/to-loopback"] = redirect(server2.url("/landed"))
    server.routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    ctx = TaskContext("run", "step", 1)
    with pytest.raises(AddressRefused, match=r"refused 127\.0\.0\.2: loopback address"):
        await call(["127.0.0.1"], ctx, url=server.url("/to-loopback"))
    assert [hop["status"] for hop in ctx.details["hops"]] == [302]
    with pytest.raises(AddressRefused, match=r"refused 169\.254\.169\.254: metadata address"):
        await call(["127.0.0.1"], url=server.url("/to-metadata"))
    assert connects == [("127.0.0.1", server.port)] * 2  # the hops never connected
    assert server2.accepts == 0 and server2.requests == []


async def test_allowed_redirects_are_followed_without_credentials_across_origins(
    server: Server, server2: Server
) -> None:
    server.routes["/go"] = redirect(server2.url("/landed"), 307)
    ctx = TaskContext("run", "step", 1)
    got = await call(
        ["127.0.0.1", "127.0.0.2"],
        ctx,
        method="POST",
        url=server.url("/go"),
        json={"k": 1},
        headers={"Authorization": "Bearer secret", "Cookie": "s=1", "X-Trace": "t"},
    )
    assert got["url"] == server2.url("/landed") and got["json"]["method"] == "POST"  # 307 keeps it
    assert json.loads(got["json"]["body"]) == {"k": 1}
    landed = server2.requests[0]["headers"]
    assert "Authorization" not in landed and "Cookie" not in landed and landed["X-Trace"] == "t"
    assert server.requests[0]["headers"]["Authorization"] == "Bearer secret"
    assert [hop["address"] for hop in ctx.details["hops"]] == [
        f"127.0.0.1:{server.port}",
        f"127.0.0.2:{server2.port}",
    ]


async def test_redirect_limits(server: Server) -> None:
    allow = ["127.0.0.1"]
    server.routes["/loop"] = redirect("/loop")
    server.routes["/once"] = redirect("/hello", 303)
    with pytest.raises(TaskFailed, match="redirected more than 5 times"):
        await call(allow, url=server.url("/loop"))
    assert len(server.requests) == 6
    got = await call(allow, method="POST", url=server.url("/once"), json={"a": 1})
    assert got["json"]["method"] == "GET" and got["json"]["path"] == "/hello"  # 303: see other
    with pytest.raises(TaskFailed, match="answered 302"):
        await call(allow, url=server.url("/loop"), follow_redirects=False)
    got = await call(allow, url=server.url("/loop"), follow_redirects=False, expect_status=[302])
    assert got["status"] == 302 and got["headers"]["location"] == "/loop"


# -- size and time -----------------------------------------------------------------------------


def big(h: _Handler, body: bytes) -> None:
    respond(h, 200, b"x" * 5000, {"Content-Type": "text/plain"})


def streamed(h: _Handler, body: bytes) -> None:
    # no Content-Length: the body ends when the connection closes (HTTP/1.0)
    h.send_response(200)
    h.send_header("Content-Type", "text/plain")
    h.end_headers()
    for _ in range(50):
        h.wfile.write(b"y" * 1000)
        h.wfile.flush()


async def test_a_response_larger_than_max_bytes_fails(server: Server) -> None:
    server.routes["/big"] = big
    server.routes["/streamed"] = streamed
    allow = ["127.0.0.1"]
    with pytest.raises(TaskFailed, match=r"is 5000 bytes, more than max_bytes \(1024\)"):
        await call(allow, url=server.url("/big"), max_bytes=1024)
    with pytest.raises(TaskFailed, match=r"is more than max_bytes \(4096\); stopped"):
        await call(allow, url=server.url("/streamed"), max_bytes=4096)
    got = await call(allow, url=server.url("/streamed"), max_bytes=50_000)
    assert len(got["body"]) == 50_000
    got = await call(allow, method="HEAD", url=server.url("/big"), max_bytes=1024)  # no body comes
    assert got["status"] == 200 and got["headers"]["content-length"] == "5000"


async def test_the_timeout_bounds_the_whole_call(server: Server) -> None:
    def slow(h: _Handler, body: bytes) -> None:
        server.release.wait(5)
        respond(h, 200, b"late")

    def drip(h: _Handler, body: bytes) -> None:  # every read is quick; the whole is not
        h.send_response(200)
        h.end_headers()
        while not server.release.wait(0.05):
            h.wfile.write(b".")
            h.wfile.flush()

    server.routes["/slow"], server.routes["/drip"] = slow, drip
    for path in ("/slow", "/drip"):
        started = time.monotonic()
        with pytest.raises(TaskFailed, match=r"timed out after 0.5s"):
            await call(["127.0.0.1"], url=server.url(path), timeout_s=0.5)
        assert time.monotonic() - started < 2


# -- DNS rebinding -----------------------------------------------------------------------------


async def test_a_rebinding_name_cannot_move_a_checked_connection(
    server: Server, connects: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # rebind.test answers an address the policy accepts (127.0.0.1, allowed by address: the
    # stand-in for a public one), then a private one. A client that checked the name and
    # then connected by name would resolve twice and connect to 10.0.0.1.
    lookups = fake_dns(monkeypatch, "rebind.test", ["127.0.0.1", "10.0.0.1"])
    ctx = TaskContext("run", "step", 1)
    got = await call(["127.0.0.1"], ctx, url=server.url("/hello", host="rebind.test"))
    assert got["json"]["headers"]["Host"] == f"rebind.test:{server.port}"  # the name, not the address
    assert lookups == ["127.0.0.1"]  # resolved once: the connection went where the check looked
    assert connects == [("127.0.0.1", server.port)]
    assert ctx.details["hops"][0]["address"] == f"127.0.0.1:{server.port}"
    # the next connection resolves again, and is checked again
    with pytest.raises(AddressRefused, match=r"rebind\.test \(10\.0\.0\.1\): private address"):
        await call(["127.0.0.1"], url=server.url("/hello", host="rebind.test"))
    assert lookups == ["127.0.0.1", "10.0.0.1"] and connects == [("127.0.0.1", server.port)]
    assert len(server.requests) == 1


async def test_a_public_answer_then_loopback_connects_to_the_public_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same with a public first answer: the connection is recorded and failed, never opened.
    lookups = fake_dns(monkeypatch, "rebind.test", ["93.184.215.14", "127.0.0.1"])
    tried: list[tuple[str, int]] = []

    async def connect_tcp(self: httpcore.AnyIOBackend, host: str, port: int, **kwargs: Any) -> Any:
        tried.append((host, port))
        raise httpcore.ConnectError("not in a test")

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    with pytest.raises(TaskFailed, match="ConnectError"):
        await call(None, url="http://rebind.test:8080/")
    assert tried == [("93.184.215.14", 8080)] and lookups == ["93.184.215.14"]


# -- TLS with a pinned address -----------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for pinned.test (a name no resolver knows)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=pinned.test",
         "-addext", "subjectAltName=DNS:pinned.test"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from _serve(Server("127.0.0.1", tls=context))


async def test_tls_verifies_the_host_name_while_connecting_to_the_pinned_address(
    tls_server: Server,
    server: Server,
    certificate: tuple[Path, Path],
    connects: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust the test certificate
    fake_dns(monkeypatch, "pinned.test", ["127.0.0.1"])
    allow = ["127.0.0.1"]
    got = await call(allow, url=tls_server.url("/hello", host="pinned.test", scheme="https"))
    assert got["status"] == 200 and got["json"]["headers"]["Host"] == f"pinned.test:{tls_server.port}"
    assert tls_server.server_names == ["pinned.test"]  # SNI: the name, not the address
    assert connects == [("127.0.0.1", tls_server.port)]
    # the same server by its address: the certificate does not name it, and verification fails
    with pytest.raises(TaskFailed, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await call(allow, url=tls_server.url("/hello", scheme="https"))
    # and a redirect from https to http is refused before its connection
    tls_server.routes["/down"] = redirect(server.url("/plain"))
    with pytest.raises(TaskFailed, match="refused a redirect from https to http"):
        await call(allow, url=tls_server.url("/down", host="pinned.test", scheme="https"))
    assert server.accepts == 0


# -- in a plan ---------------------------------------------------------------------------------


@pytest.fixture
async def allowed_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine("memory://", poll_s=0.05, workdir=tmp_path, http_allow=["127.0.0.1"]) as eng:
        yield eng


async def test_a_plan_calls_http_and_uses_its_answer(allowed_engine: Engine, server: Server) -> None:
    plan = {
        "name": "http",
        "steps": [
            {"id": "create", "task": "http",
             "with": {"method": "POST", "url": server.url("/items"), "json": {"name": "x"}}},
            {"id": "use", "task": "echo", "needs": ["create"],
             "with": {"status": "${{ steps.create.output.status }}",
                      "sent": "${{ steps.create.output.json.body }}"}},
        ],
    }  # fmt: skip
    run = await allowed_engine.run(plan)
    assert run.status is RunStatus.COMPLETED
    steps = {s.step_id: s for s in await allowed_engine.store.get_steps(run.id)}
    assert steps["use"].output == {"status": 200, "sent": '{"name":"x"}'}
    assert server.requests[0]["method"] == "POST"
    attempts = await allowed_engine.store.get_attempts(run.id)
    detail = next(a.detail for a in attempts if a.step_id == "create")
    assert detail is not None and detail["hops"][0]["address"] == f"127.0.0.1:{server.port}"


async def test_a_plan_step_to_loopback_fails_without_the_allow_list(tmp_path: Path, server: Server) -> None:
    async with Engine("memory://", poll_s=0.05, workdir=tmp_path) as engine:
        plan = {
            "name": "ssrf",
            "policy": {"retry": {"attempts": 2, "backoff_s": 0.01}},
            "steps": [{"id": "peek", "task": "http", "with": {"url": server.url("/")}}],
        }
        run = await engine.run(plan)
        assert run.status is RunStatus.FAILED
        (step,) = await engine.store.get_steps(run.id)
        assert step.status is StepStatus.FAILED and step.attempt == 2
        assert step.error is not None and "loopback address" in step.error
        with pytest.raises(PlanError, match="method must be one of"):
            engine.load(
                {
                    "name": "bad",
                    "steps": [{"id": "a", "task": "http", "with": {"url": "http://x/", "method": "BREW"}}],
                }
            )
    assert server.accepts == 0


async def test_engine_execute_runs_http(allowed_engine: Engine, server: Server) -> None:
    got = await allowed_engine.execute("http", {"url": server.url("/ping")})
    assert got["status"] == 200 and got["json"]["path"] == "/ping"
    await asyncio.sleep(0)
