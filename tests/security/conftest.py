"""What every security test against a running server shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _close_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    """The HTTP clients a test made of its module's server are closed after it."""
    yield
    for name in ("api", "server"):
        value = request.node.funcargs.get(name)  # as this test had it (some are URLs)
        if hasattr(value, "close_clients"):
            value.close_clients()
