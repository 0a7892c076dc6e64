"""The PostgreSQL store."""

from baton.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
