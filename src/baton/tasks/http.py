"""The ``http`` task: one HTTP request to a public address, or to one the allow-list names.

Before any connection, the host is resolved and every address it resolves to is checked:
loopback, private (RFC 1918, fc00::/7), link-local, multicast, unspecified, reserved,
shared (CGNAT, 100.64/10) and the cloud metadata addresses are refused, also when they are
written another way (``2130706433``, ``0x7f000001``, ``127.1``: the resolver reads these
as IPv4) or embedded in an IPv6 address (``::ffff:127.0.0.1``, 6to4, NAT64).

The allow-list (``Engine(http_allow=[...])``, or ``BATON_HTTP_ALLOW``, comma-separated)
permits what it names despite that: a host (``localhost``), the hosts under a domain
(``*.corp.example``: not ``corp.example`` itself), an address or a network
(``10.1.0.0/16``). A metadata address is reached only when the list names that address
itself: no pattern or network covers it.

The check and the connection are one step (:class:`PinnedBackend`, httpcore's network
backend): the socket is opened to an address just checked, never to the name, so the name
is resolved once per connection and a DNS answer that changes afterwards (rebinding) cannot
move it. TLS still verifies the certificate against the URL's host name, which is also the
SNI and the Host header. Each redirect is a new request and is checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json as jsonlib
import os
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import httpcore
import httpx

from baton.errors import TaskFailed, UsageError
from baton.plan.refs import has_refs
from baton.tasks.registry import TaskContext, TaskDef

ALLOW_ENV = "BATON_HTTP_ALLOW"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
DEFAULT_MAX_BYTES = 1 << 20
#: the most a response may be made to hold: the output is stored with the step
MAX_MAX_BYTES = 16 << 20
MAX_REDIRECTS = 5
#: how much of an unexpected answer's body goes into the error
PREVIEW_CHARS = 200
#: set from the URL and the body, never by the step
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
#: what a request carries only to the origin it was written for
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

METADATA: frozenset[Address] = frozenset(
    ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_SHARED = ip_network("100.64.0.0/10")
_NAT64 = ip_network("64:ff9b::/96")


class AddressRefused(TaskFailed):
    """The request would reach an address that is not public, which the allow-list does not name."""

    code = "address_refused"


def refusal(address: Address) -> str | None:
    """Why ``address`` is not a public one (None when it is)."""
    if address in METADATA:
        return "metadata address"
    if isinstance(address, IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:  # the packets go to the IPv4 address inside
            return refusal(embedded)
    if address.is_loopback:
        return "loopback address"
    if address.is_unspecified:
        return "unspecified address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if address in _SHARED:
        return "shared (CGNAT) address"
    if address.is_reserved:
        return "reserved address"
    if address.is_private:
        return "private address"
    if not address.is_global:
        return "non-public address"
    return None


def _address(text: str) -> Address | None:
    try:
        return ip_address(text.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to, in the resolver's order (an IP literal: itself)."""
    literal = _address(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TaskFailed(f"http: cannot resolve {host}: {exc}") from None
    found: dict[Address, None] = {}
    for *_, sockaddr in infos:
        found.setdefault(ip_address(sockaddr[0]), None)
    return list(found)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which hosts and addresses the ``http`` task may reach besides public ones."""

    hosts: frozenset[str] = frozenset()
    #: ``.corp.example`` for ``*.corp.example``
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, entries: str | Iterable[str]) -> AddressPolicy:
        """From allow-list entries (a string: comma-separated); UsageError names a bad one."""
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        hosts: set[str] = set()
        domains: list[str] = []
        networks: list[Network] = []
        for raw in items:
            if not isinstance(raw, str):
                raise UsageError(f"http allow-list: entries are strings, not {raw!r}")
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            labels = name.split(".")
            if not all(label and len(label) <= 63 and _is_label(label) for label in labels):
                raise UsageError(
                    f"http allow-list: {raw!r} is not a host, a *.domain, an address or a network"
                )
            if entry.startswith("*."):
                domains.append("." + name)
            else:
                hosts.add(name)
        return cls(frozenset(hosts), tuple(domains), tuple(networks))

    @classmethod
    def from_env(cls) -> AddressPolicy:
        """From ``BATON_HTTP_ALLOW`` (empty when unset)."""
        return cls.of(os.environ.get(ALLOW_ENV, ""))

    def allows_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hosts or name.endswith(self.domains)

    def allows_address(self, address: Address) -> bool:
        if address in METADATA:  # only by name: a network or a host pattern is not enough
            return any(n.num_addresses == 1 and address in n for n in self.networks)
        return any(address in n for n in self.networks)

    async def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses of ``host`` the task may connect to: all of them, or AddressRefused."""
        found = await resolve(host, port)
        if not found:
            raise TaskFailed(f"http: {host} resolves to no address")
        by_name = self.allows_host(host)
        for address in found:
            reason = refusal(address)
            if reason is None or self.allows_address(address):
                continue
            if by_name and reason != "metadata address":
                continue
            shown = host if host == str(address) else f"{host} ({address})"
            raise AddressRefused(
                f"http: refused {shown}: {reason}, which the allow-list ({ALLOW_ENV} or"
                " http_allow) does not name"
            )
        return found


def _is_label(label: str) -> bool:
    return label.replace("-", "").replace("_", "").isalnum() and label.isascii() and label[0] != "-"


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens each connection to an address just checked by the policy, never to a name."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.addresses(host, port)
        failure: Exception | None = None
        for address in addresses:  # each one checked; the first that answers
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("http: unix sockets are not reachable")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@functools.lru_cache(maxsize=4)
def _tls(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    # keyed by SSL_CERT_FILE and SSL_CERT_DIR, which httpx reads: certifi's roots or those,
    # loaded once rather than per request
    return httpx.create_ssl_context()


def _client(policy: AddressPolicy, timeout_s: float) -> httpx.AsyncClient:
    tls = _tls(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    transport = httpx.AsyncHTTPTransport(verify=tls)
    # httpx takes no network backend; its pool (httpcore's) does. No proxy either: a proxy
    # would connect for us, to addresses the policy never sees.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=tls, max_connections=4, network_backend=PinnedBackend(policy)
    )
    return httpx.AsyncClient(transport=transport, trust_env=False, timeout=timeout_s, follow_redirects=False)


def input_problems(inputs: Mapping[str, Any], planned: bool = False) -> list[str]:
    """What is wrong with the ``http`` task's inputs; in a plan (``planned``), values with
    references are known only at run time and skipped."""
    given = {k: v for k, v in inputs.items() if not (planned and has_refs(v))}
    problems: list[str] = []
    method = given.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if "url" in given or not planned:  # a plan without one is told so by the registry
        problems += _url_problems(given.get("url"))
    headers = given.get("headers")
    if headers is not None:
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            problems.append("headers must map names to strings")
        else:
            reserved = sorted(k for k in headers if k.lower() in RESERVED_HEADERS)
            if reserved:
                problems.append(f"headers may not set {', '.join(reserved)} (set from the url and body)")
    if inputs.get("json") is not None and inputs.get("body") is not None:
        problems.append("give json or body, not both")
    if given.get("body") is not None and not isinstance(given["body"], str):
        problems.append("body must be a string")
    timeout = given.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not _number(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        problems.append(f"timeout_s must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}")
    limit = given.get("max_bytes", DEFAULT_MAX_BYTES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_MAX_BYTES:
        problems.append(f"max_bytes must be a whole number > 0 and <= {MAX_MAX_BYTES}")
    if not isinstance(given.get("follow_redirects", True), bool):
        problems.append("follow_redirects must be true or false")
    expected = given.get("expect_status")
    if expected is not None and (
        not isinstance(expected, list)
        or not expected
        or not all(isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in expected)
    ):
        problems.append("expect_status must be a list of HTTP statuses (100-599)")
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _url_problems(url: Any) -> list[str]:
    if not isinstance(url, str):
        return ["url must be a string"]
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return [f"url {url!r} is not a URL: {exc}"]
    if parsed.scheme not in ("http", "https"):
        return [f"url must be http or https, not {parsed.scheme or 'relative'}: {url!r}"]
    if not parsed.host:
        return [f"url {url!r} names no host"]
    return []


def _next_hop(request: httpx.Request, following: httpx.Request) -> httpx.Request:
    """The redirect's request, refused when it leaves https; credentials stay at their origin."""
    if request.url.scheme == "https" and following.url.scheme != "https":
        raise TaskFailed(f"http: refused a redirect from https to {following.url.scheme}: {following.url}")
    if following.url.scheme not in ("http", "https"):
        raise TaskFailed(f"http: refused a redirect to {following.url}")
    if (request.url.host, request.url.port) != (following.url.host, following.url.port):
        for name in CREDENTIAL_HEADERS:
            following.headers.pop(name, None)
    return following


async def _read(response: httpx.Response, limit: int, strict: bool = True) -> bytes:
    """The body, decoded; past ``limit`` bytes: TaskFailed, or (not ``strict``) the first ones."""
    declared = str(response.headers.get("content-length", ""))
    bodiless = response.request.method == "HEAD" or response.status_code in (204, 304)
    if strict and not bodiless and declared.isdigit() and int(declared) > limit:
        raise TaskFailed(
            f"http: the response of {response.url} is {declared} bytes, more than max_bytes ({limit})"
        )
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            if not strict:
                return bytes(data[:limit])
            raise TaskFailed(
                f"http: the response of {response.url} is more than max_bytes ({limit}); stopped"
            )
    return bytes(data)


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _is_text(media: str) -> bool:
    return (
        media.startswith("text/")
        or _is_json(media)
        or media.endswith("+xml")
        or media in ("application/xml", "application/javascript", "application/x-www-form-urlencoded")
    )


def _text(response: httpx.Response, data: bytes) -> str:
    try:
        return data.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", errors="replace")


def _output(response: httpx.Response, data: bytes) -> dict[str, Any]:
    media = _media_type(response)
    text: str | None = None
    if _is_text(media):
        text = _text(response, data)
    elif not media:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    parsed: Any = None
    if text is not None and _is_json(media):
        try:
            parsed = jsonlib.loads(text)
        except ValueError:
            parsed = None
    return {
        "status": response.status_code,
        "url": str(response.url),
        "headers": dict(response.headers.items()),
        "body": text if text is not None else base64.b64encode(data).decode("ascii"),
        "body_encoding": "text" if text is not None else "base64",
        "json": parsed,
    }


def _peer(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None


async def fetch(
    policy: AddressPolicy,
    *,
    method: str = "GET",
    url: str,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    body: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    follow_redirects: bool = True,
    expect_status: list[int] | None = None,
    hops: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Send the request under ``policy``; the answer (see the ``http`` task), or TaskFailed.

    ``hops``, when given, receives each request sent: its url, the address it went to, and
    the status.
    """
    given = {
        "method": method,
        "url": url,
        "headers": headers,
        "json": json,
        "body": body,
        "timeout_s": timeout_s,
        "max_bytes": max_bytes,
        "follow_redirects": follow_redirects,
        "expect_status": expect_status,
    }
    problems = input_problems({k: v for k, v in given.items() if v is not None})
    if problems:
        raise TaskFailed("http: " + "; ".join(problems))
    method = method.upper()
    sent = hops if hops is not None else []
    try:
        async with asyncio.timeout(timeout_s), _client(policy, timeout_s) as client:
            request = client.build_request(method, url, headers=dict(headers or {}), json=json, content=body)
            for _ in range(MAX_REDIRECTS + 1):
                response = await client.send(request, stream=True)
                try:
                    hop = {
                        "url": str(request.url),
                        "address": _peer(response),
                        "status": response.status_code,
                    }
                    sent.append(hop)
                    following = response.next_request if follow_redirects else None
                    if following is None:
                        expected = expect_status or range(200, 300)
                        if response.status_code not in expected:
                            preview = _text(response, await _read(response, 4 * PREVIEW_CHARS, strict=False))
                            raise TaskFailed(
                                f"http: {method} {request.url} answered {response.status_code}"
                                f" {response.reason_phrase}: {preview[:PREVIEW_CHARS]!r}"
                            )
                        return _output(response, await _read(response, max_bytes))
                finally:
                    await response.aclose()
                request = _next_hop(request, following)
            raise TaskFailed(f"http: {url} redirected more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise TaskFailed(f"http: {method} {url} timed out after {timeout_s:g}s") from None
    except httpx.TimeoutException:
        raise TaskFailed(f"http: {method} {url} timed out after {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise TaskFailed(f"http: {method} {url} failed: {type(exc).__name__}: {exc}") from None


def http_task(allow: str | Iterable[str] | None = None) -> TaskDef:
    """The ``http`` task, allowed what ``allow`` names (None: ``BATON_HTTP_ALLOW`` at each call)."""
    fixed = AddressPolicy.of(allow) if allow is not None else None

    async def http(
        ctx: TaskContext,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        json: Any = None,
        body: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        follow_redirects: bool = True,
        expect_status: list[int] | None = None,
    ) -> dict[str, Any]:
        """Send one HTTP request to a public address (or one the allow-list names).

        ``method`` GET (default), HEAD, POST, PUT, PATCH, DELETE or OPTIONS; ``url`` http or
        https; ``headers`` a mapping of strings; ``json`` (sent as JSON) or ``body`` (a
        string), not both. ``timeout_s`` (30, at most 300) bounds the whole call, redirects
        and body included; a body larger than ``max_bytes`` (1 MiB, at most 16 MiB) fails
        the attempt. Up to 5 redirects are followed (``follow_redirects``), each checked
        like the first, never from https to http. A status outside ``expect_status``
        (default: any 2xx) fails the attempt, with the start of the body, so retries apply.

        Output: ``status``; ``url``, the last one; ``headers``, names in lower case (a
        repeated header's values joined by ", "); ``body``, the text when the content type
        is textual (text/*, JSON, XML) or absent and UTF-8, else base64, as
        ``body_encoding`` ("text" or "base64") says; ``json``, the parsed body when the
        content type is JSON and the body parses, else null. The attempt's details list the
        requests sent (``hops``: url, the address connected to, status).
        """
        policy = fixed if fixed is not None else AddressPolicy.from_env()
        hops: list[dict[str, Any]] = []
        ctx.details["hops"] = hops
        return await fetch(
            policy,
            method=method,
            url=url,
            headers=headers,
            json=json,
            body=body,
            timeout_s=timeout_s,
            max_bytes=max_bytes,
            follow_redirects=follow_redirects,
            expect_status=expect_status,
            hops=hops,
        )

    def check(inputs: Mapping[str, Any]) -> list[str]:
        problems = input_problems(inputs, planned=True)
        if fixed is None:
            try:
                AddressPolicy.from_env()
            except UsageError as exc:
                problems.append(f"{ALLOW_ENV}: {exc.message}")
        return problems

    return TaskDef.of("http", http, check=check, needs=("http",))


__all__ = ["ALLOW_ENV", "AddressPolicy", "AddressRefused", "PinnedBackend", "fetch", "http_task", "refusal"]
