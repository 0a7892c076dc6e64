"""Shared fixtures: a PostgreSQL schema per test, when the server is there.

Tests that need PostgreSQL connect to ``BATON_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/test``), each in a schema of its own that is
dropped afterwards. When the server is unreachable they are skipped with the reason, unless
``BATON_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from baton.store import MemoryStore, SQLiteStore, Store

PG_URL = os.environ.get("BATON_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("BATON_REQUIRE_SERVICES") == "1"


@functools.cache
def _pg_problem() -> str | None:
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name in the test database (dropped after the test)."""
    problem = _pg_problem()
    if problem is not None:
        message = f"PostgreSQL at {PG_URL} is unreachable: {problem}"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} (BATON_REQUIRE_SERVICES=1 requires it)")
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Each call gives a store object on the same data: another process's view of it."""
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    if request.param == "postgres":
        from baton.store.postgres import PostgresStore

        schema = request.getfixturevalue("pg_schema")
        return lambda: PostgresStore(PG_URL, schema=schema)
    path = tmp_path / "baton.db"
    return lambda: SQLiteStore(path)
