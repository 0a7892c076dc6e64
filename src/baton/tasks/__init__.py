"""Tasks: the registry and the built-in tasks."""

from baton.tasks.registry import Registry, TaskContext, TaskDef, task

__all__ = ["Registry", "TaskContext", "TaskDef", "task"]
