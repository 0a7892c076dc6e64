"""The provider protocol, and the HTTP plumbing the HTTP providers share."""

from __future__ import annotations

import email.utils
import time
from typing import Any, Protocol

import httpx

from baton.llm.types import (
    ChatRequest,
    ChatResponse,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)


class Provider(Protocol):
    """Where model calls go: ``complete`` one request, or raise a ProviderError."""

    name: str

    async def complete(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None: ...


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def post_json(
    client: httpx.AsyncClient, provider: str, url: str, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    """POST a JSON body; the JSON answer, or the ProviderError its status means."""
    try:
        response = await client.post(url, json=body, headers=headers)
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(f"{provider}: no answer from {url} in time ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise ProviderUnavailable(f"{provider}: cannot reach {url}: {exc}") from None
    status = response.status_code
    if status == 200:
        try:
            data = response.json()
        except ValueError:
            raise ProviderUnavailable(
                f"{provider}: the answer from {url} is not JSON", status=status
            ) from None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{provider}: unexpected answer from {url}", status=status)
        return data
    detail = _error_detail(response)
    wait = retry_after_s(response.headers.get("retry-after"))
    message = f"{provider}: HTTP {status} from {url}" + (f": {detail}" if detail else "")
    error: type[ProviderError]
    if status == 429:
        error = RateLimited
    elif status >= 500 or status == 408:
        error = ProviderUnavailable
    else:
        error = ProviderRejected
    raise error(message, status=status, retry_after_s=wait)


def _error_detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return str(data)[:200]
