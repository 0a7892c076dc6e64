"""The agent layer on the engine: tasks in words classified, templates chosen and learned,
goals decomposed into plans that the one executor runs."""

from baton.agents.classify import GENERAL, LANGUAGES, TASK_TYPES, Classification, classify

__all__ = ["GENERAL", "LANGUAGES", "TASK_TYPES", "Classification", "classify"]
