"""Interfaces over the network: the REST API (``baton serve``) and NATS (``baton nats``).

The web framework loads when an interface is made (``create_app``), not when the command
line or a key's lookup imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from baton.api.auth import ROLES, Role, create_key

if TYPE_CHECKING:
    from baton.api.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from baton.api.app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["ROLES", "Role", "create_app", "create_key"]
