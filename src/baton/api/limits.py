"""Rate limits, and denials that cannot grow the database.

Every request that needs a key counts against two limits (moving windows, in this
process): its key's (``--rate-limit``, default 200 per second) and, while it has no valid
key, its client address's (``--rate-limit-address``, default 20 per second), so guessing
keys is slow and a flood of bad requests is turned away before it touches the store. Over
the limit: 429 with ``Retry-After``.

Denials go on the audit trail, but not one entry each: the first denial of an actor for a
reason at one place (an endpoint's route, a subject) is written at once, the ones after it
within ``DENIAL_WINDOW_S`` are counted, and the count is written as one entry (``denied``,
with ``repeated``) when the window ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from baton import audit
from baton.errors import UsageError
from baton.store import Store

if TYPE_CHECKING:
    from limits import RateLimitItem

DEFAULT_PER_KEY = "200/second"
DEFAULT_PER_ADDRESS = "20/second"
#: denials of one actor for one reason within this long make one audit entry
DENIAL_WINDOW_S = 60.0


def rate(text: str | None) -> RateLimitItem | None:
    """``"200/second"``, ``"1000/minute"``... or ``none`` (no limit); UsageError if bad."""
    if text is None or text.strip().lower() in ("none", "off", "0"):
        return None
    from limits import parse  # the library takes a sixth of a second to import: serve only

    try:
        return parse(text)
    except ValueError:
        raise UsageError(f"a rate limit reads like 200/second or 1000/minute, not {text!r}") from None


class Limits:
    """The rate limits of one server process."""

    def __init__(
        self, per_key: str | None = DEFAULT_PER_KEY, per_address: str | None = DEFAULT_PER_ADDRESS
    ) -> None:
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.per_key = rate(per_key)
        self.per_address = rate(per_address)
        self._limiter: Any = MovingWindowRateLimiter(MemoryStorage())

    def key(self, key_id: str) -> float | None:
        """Count a request of this key: None, or the seconds to wait when over its limit."""
        return self._hit(self.per_key, "key", key_id)

    def address(self, address: str) -> float | None:
        """Count a request without a valid key from this address (as ``key``)."""
        return self._hit(self.per_address, "address", address)

    def _hit(self, item: RateLimitItem | None, kind: str, who: str) -> float | None:
        if item is None or self._limiter.hit(item, kind, who):
            return None
        reset = float(self._limiter.get_window_stats(item, kind, who).reset_time)
        return max(1.0, float(math.ceil(reset - time.time())))


@dataclass(slots=True)
class _Burst:
    started: float
    count: int = 0  # denials after the first, not written yet
    detail: dict[str, object] | None = None


class Denials:
    """Writes denials to the audit trail, a burst of one actor's for one reason as one entry."""

    def __init__(self, store: Store, window_s: float = DENIAL_WINDOW_S) -> None:
        self.store = store
        self.window_s = window_s
        self._bursts: dict[tuple[str, str, str], _Burst] = {}

    async def deny(
        self, actor: str, subject: str, reason: str, *, place: str | None = None, **detail: object
    ) -> None:
        """A denial of ``actor`` for ``reason`` about ``subject``; ``place`` (default: the
        subject) is what bursts are told apart by: a route, not the ids in its path."""
        now = time.time()
        await self.flush(now)
        burst = self._bursts.get((actor, reason, place or subject))
        if burst is not None:
            burst.count += 1
            burst.detail = {"last_subject": subject, **detail}
            return
        self._bursts[(actor, reason, place or subject)] = _Burst(now)
        await audit.record(self.store, actor, "denied", subject, reason=reason, **detail)

    async def flush(self, now: float | None = None) -> None:
        """Write the counts of the bursts whose window ended (all of them when ``now`` is inf)."""
        now = time.time() if now is None else now
        for (actor, reason, place), burst in list(self._bursts.items()):
            if now - burst.started < self.window_s:
                continue
            del self._bursts[(actor, reason, place)]
            if burst.count:
                since = round(burst.started, 3)
                subject = str((burst.detail or {}).get("last_subject", ""))
                await audit.record(
                    self.store, actor, "denied", subject, reason=reason, repeated=burst.count, since=since
                )


__all__ = ["DEFAULT_PER_ADDRESS", "DEFAULT_PER_KEY", "Denials", "Limits", "rate"]
