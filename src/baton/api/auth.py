"""API keys: bearer tokens with a role, kept in the store as the hash of their secret.

A key reads ``baton_<id>_<secret>``: the id names it in lists and in the audit trail, the
secret (256 random bits) is shown once, when the key is made. The store keeps the SHA-256
of the whole token; a random token needs no slow hash, and a lookup by hash takes no
comparison that timing could reveal.

Roles, each allowing what the one before it does: ``viewer`` reads; ``operator`` starts,
controls and enqueues; ``admin`` manages keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import IntEnum

from baton.errors import UsageError
from baton.store import ApiKey, Store


class Role(IntEnum):
    viewer = 1
    operator = 2
    admin = 3


ROLES = [r.name for r in Role]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


async def create_key(store: Store, role: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key of ``role``: its record, and the token (shown once, never stored)."""
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    key_id = secrets.token_hex(5)
    token = f"baton_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id, role, name, time.time())
    await store.put_api_key(record, token_hash(token))
    return record, token


async def authenticate(store: Store, token: str) -> ApiKey | None:
    """The live key a bearer token is, or None."""
    if not token.startswith("baton_") or len(token) > 200:
        return None
    return await store.api_key_by_hash(token_hash(token))


__all__ = ["ROLES", "Role", "authenticate", "create_key", "token_hash"]
