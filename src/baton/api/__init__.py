"""Interfaces over the network: the REST API (``baton serve``)."""

from baton.api.app import create_app
from baton.api.auth import ROLES, Role, create_key

__all__ = ["ROLES", "Role", "create_app", "create_key"]
