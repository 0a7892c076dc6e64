"""The fake model server, in a process of its own, for every LLM test that speaks HTTP."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


class FakeServer:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def program(self, *answers: dict[str, Any]) -> None:
        """The next answers, in order, and forget what was received."""
        httpx.post(f"{self.url}/program", json=list(answers)).raise_for_status()

    def received(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = httpx.get(f"{self.url}/requests").json()
        return answer


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    script = Path(__file__).with_name("fake_provider.py")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield FakeServer(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def fake(fake_server: FakeServer) -> FakeServer:
    fake_server.program()
    return fake_server
