"""A server without keys (``baton serve --no-auth``) answers this machine's own clients only.

Serving on loopback is not enough: any web page the machine's browser opens can send a
"simple" request there (a ``text/plain`` POST needs no preflight), and DNS rebinding makes
a foreign name resolve to 127.0.0.1 so the page can read the answers too. So, without
keys, every request must:

- name this server in its ``Host`` header: the address it listens on, ``localhost`` or a
  name given with ``--allowed-host`` (a rebound name is refused: 421);
- come from no other origin: an ``Origin`` header naming another site, or
  ``Sec-Fetch-Site: cross-site``, is refused (403);
- carry a body only as JSON or YAML (415 otherwise), which a browser cannot send across
  origins without a preflight that this server never grants.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

#: the content types of a plan in YAML
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
#: the content types a request body may have
BODY_TYPES = frozenset({"application/json", *YAML_TYPES})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def allowed_hosts(host: str, port: int, names: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` values that name a server listening on ``host``:``port``."""
    bare = {host, "localhost", "127.0.0.1", "[::1]", *names}
    if ":" in host and not host.startswith("["):
        bare.add(f"[{host}]")
    return frozenset({*(h.lower() for h in bare), *(f"{h.lower()}:{port}" for h in bare)})


class LocalOnly:
    """ASGI middleware: refuse what a browser on another origin could send (see module)."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["method"], headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        body = json.dumps({"code": code, "message": message, "problems": []}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, method: str, headers: dict[str, Any]) -> tuple[int, str, str] | None:
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return 421, "wrong_host", f"this server does not answer for host {host!r} without keys"
        origin = headers.get("origin")
        if origin is not None and (urlsplit(origin).netloc.lower() not in self.hosts):
            return 403, "cross_origin", f"requests from {origin!r} are refused by a server without keys"
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross_origin", "cross-site requests are refused by a server without keys"
        if method in _WITH_BODY:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind and kind not in BODY_TYPES:
                return 415, "unsupported_media_type", f"a body must be JSON or YAML, not {kind!r}"
        return None


__all__ = ["BODY_TYPES", "YAML_TYPES", "LocalOnly", "allowed_hosts"]
