"""The agent tests use the fake model server of the LLM tests (a real HTTP process)."""

from tests.llm.conftest import fake, fake_server  # noqa: F401  (fixtures)
