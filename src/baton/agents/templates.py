"""Templates: how a kind of task is carried out, as files — prompts per sub-task, the
decomposition skeleton (spec → code → test → review...), validators and a model tier.

A template is a YAML file::

    id: python-testing
    task_type: testing            # or general: a universal template
    language: python              # omitted: any language
    description: pytest tests, written from a short list of cases
    tier: cheap                   # used when the LLM config has that tier
    result: tests                 # the sub-task whose output is the goal's (default: the last)
    subtasks:
      - id: cases
        prompt: "List the cases worth testing for: {{task}}"
      - id: tests
        needs: [cases]
        prompt: "Write pytest tests for: {{task}}"
        extract: code
        validate: [{kind: python_syntax}]

Prompts may use ``{{task}}``, ``{{language}}``, ``{{target_file}}``, ``{{workspace}}`` and
``{{context}}``; the outputs of a sub-task's ``needs`` reach its model as context (as in any
``llm.generate`` step), and ``${{ steps.<id>.output.text }}`` quotes one where it must be.

Selection goes along the fallback chain: the templates of the task type and the language
(specific), of the task type for any language (language-generic), then the universal ones.
baton ships templates for every task type and for the seed languages; a directory of the
user's own adds to them (and replaces a shipped one of the same id).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml import MappingNode, Node, SequenceNode

from baton.agents.classify import GENERAL, LANGUAGES, TASK_TYPES
from baton.errors import UsageError
from baton.plan.model import STEP_ID_PATTERN
from baton.plan.reader import DocumentError, load_yaml_node, read_text
from baton.validators import option_problems

PLACEHOLDERS = ("task", "language", "target_file", "workspace", "context")
_PLACEHOLDER = re.compile(r"(?<!\$)\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
#: the most bytes a template file may have
MAX_TEMPLATE_BYTES = 256 * 1024


class TemplateError(UsageError):
    """A template file is wrong: each problem with its file and line."""

    code = "invalid_template"


class SubTask(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str = Field(pattern=STEP_ID_PATTERN, min_length=1, max_length=64)
    prompt: str = Field(min_length=1)
    needs: list[str] = Field(default_factory=list)
    extract: Literal["text", "code", "json"] = "text"
    validate_: list[dict[str, Any]] = Field(default_factory=list, alias="validate")
    role: Literal["coder", "tester", "critic"] | None = None
    #: this sub-task's model tier, over the template's
    tier: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=200_000)


class Planner(BaseModel):
    """A model that breaks the task into sub-tasks (baton.agents.planner)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_subtasks: int = Field(default=8, ge=1, le=32)
    #: attempts at a valid answer, each fed the reason the last was refused
    attempts: int = Field(default=3, ge=1, le=10)
    tier: str | None = None


class Template(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=64)
    #: one of TASK_TYPES, or general (a universal template)
    task_type: str
    #: one of LANGUAGES; None: any language
    language: str | None = None
    description: str = ""
    #: the model tier of its sub-tasks, when the LLM config has it
    tier: str | None = None
    #: the sub-task whose output is the goal's result (default: the last one)
    result: str | None = None
    #: the sub-tasks (the decomposition skeleton); or, with ``planner``, none: a model makes them
    subtasks: list[SubTask] = Field(default_factory=list, max_length=32)
    planner: Planner | None = None
    #: where it was read from (not part of the file)
    source: str = Field(default="", exclude=True)

    @field_validator("task_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in (*TASK_TYPES, GENERAL):
            raise ValueError(f"unknown task type {value!r} (known: {', '.join(TASK_TYPES)}, {GENERAL})")
        return value

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        if value is not None and value not in LANGUAGES:
            raise ValueError(f"unknown language {value!r} (known: {', '.join(LANGUAGES)})")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Template:
        if not (info.context or {}).get("deferred"):  # parse_template checks with line numbers
            for _, message in self.problems():
                raise ValueError(message)
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What is inconsistent in it, each with where (a path into the file)."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        seen: set[str] = set()
        for i, sub in enumerate(self.subtasks):
            at: tuple[str | int, ...] = ("subtasks", i)
            if sub.id in seen:
                found.append(((*at, "id"), f"sub-task id {sub.id!r} is used twice"))
            for need in sub.needs:
                if need not in seen:
                    found.append(
                        (
                            (*at, "needs"),
                            f"sub-task {sub.id!r} needs {need!r}, which is not an earlier sub-task",
                        )
                    )
            for name in _PLACEHOLDER.findall(sub.prompt):
                if name not in PLACEHOLDERS:
                    known = ", ".join("{{" + p + "}}" for p in PLACEHOLDERS)
                    found.append(((*at, "prompt"), f"unknown placeholder {{{{{name}}}}} (known: {known})"))
            for j, check in enumerate(sub.validate_):
                kind = check.get("kind")
                where = (*at, "validate", j)
                if not isinstance(kind, str):
                    found.append((where, "a validator needs a kind"))
                    continue
                options = {k: v for k, v in check.items() if k != "kind"}
                found += [
                    (where, f"validator {kind}: {problem}") for problem in option_problems(kind, options)
                ]
            seen.add(sub.id)
        if not self.subtasks and self.planner is None:
            found.append((("subtasks",), "a template needs sub-tasks, or a planner to make them"))
        if self.subtasks and self.planner is not None:
            found.append((("planner",), "a template has sub-tasks or a planner, not both"))
        if self.planner is not None:
            for name in _PLACEHOLDER.findall(self.planner.prompt):
                if name not in PLACEHOLDERS:
                    found.append((("planner", "prompt"), f"unknown placeholder {{{{{name}}}}}"))
        if self.result is not None and self.result not in seen:
            found.append((("result",), f"result names {self.result!r}, which is not a sub-task"))
        if self.task_type == GENERAL and self.language is not None:
            found.append((("language",), "a universal template (task_type: general) is for any language"))
        return found

    @property
    def level(self) -> str:
        """Where it sits on the fallback chain."""
        if self.task_type == GENERAL:
            return "universal"
        return "specific" if self.language is not None else "language-generic"

    def result_of(self, subtasks: Sequence[SubTask]) -> str:
        """The sub-task whose output is the goal's result."""
        return self.result if self.result is not None else subtasks[-1].id

    def to_yaml(self) -> str:
        """The template as a file would hold it (prompts as literal blocks)."""
        doc = self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        doc = {"id": self.id, "task_type": self.task_type, **doc}
        return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def render(prompt: str, values: Mapping[str, str | None]) -> str:
    """The prompt with its placeholders filled (an unset one becomes empty)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1)) or "", prompt)


def _line(node: Node | None, loc: Sequence[int | str]) -> int | None:
    """The line (1-based) of the deepest node of ``loc`` found under ``node``."""
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, MappingNode):
            found = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if found is None:
                found_key = next((k for k, _ in node.value if getattr(k, "value", None) == key), None)
                return found_key.start_mark.line + 1 if found_key is not None else line
            node = found
        elif isinstance(node, SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def parse_template(text: str, source: str) -> Template:
    """A template from its file's text; TemplateError naming each problem and its line."""
    try:
        data, node = load_yaml_node(text)
    except DocumentError as exc:
        raise TemplateError(f"template {source}: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"template {source}: expected a mapping with id, task_type and subtasks")
    found: list[tuple[tuple[str | int, ...], str]] = []
    try:
        template = Template.model_validate(data, context={"deferred": True})
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if isinstance(p, int | str))
            found.append((loc, str(error["msg"]).removeprefix("Value error, ")))
    else:
        found += template.problems()
    if found:
        problems = []
        for loc, message in found:
            where = ".".join(str(p) for p in loc) or "template"
            line = _line(node, loc)
            problems.append(f"{source}{f' line {line}' if line else ''}: {where}: {message}")
        raise TemplateError("invalid template: " + "; ".join(problems))
    template.source = source
    return template


def load_template(path: Path) -> Template:
    try:
        text = read_text(path, MAX_TEMPLATE_BYTES)
    except DocumentError as exc:
        raise TemplateError(f"template {path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"template {path} cannot be read: {exc}") from None
    return parse_template(text, str(path))


def shipped() -> list[Template]:
    """The templates that come with baton."""
    folder = resources.files("baton.agents").joinpath("templates")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            found.append(parse_template(entry.read_text(encoding="utf-8"), f"baton:{entry.name}"))
    return found


@dataclass(frozen=True, slots=True)
class Cell:
    """A (task type, language) cell of the fallback chain."""

    task_type: str
    language: str | None

    def __str__(self) -> str:
        return f"{self.task_type}/{self.language or '*'}"


class Library:
    """The templates a goal chooses from: the shipped ones and the user's own."""

    def __init__(self, templates: Iterable[Template]) -> None:
        self.templates: dict[str, Template] = {}
        for template in templates:
            self.templates[template.id] = template  # a later one of the same id replaces it

    @classmethod
    def load(cls, folders: Sequence[str | Path] = ()) -> Library:
        """The shipped templates, then those of ``folders`` (``*.yaml``), every error at once."""
        templates = shipped()
        problems: list[str] = []
        for folder in folders:
            path = Path(folder)
            if not path.is_dir():
                raise TemplateError(f"template directory {path} does not exist")
            for file in sorted([*path.glob("*.yaml"), *path.glob("*.yml")]):
                try:
                    templates.append(load_template(file))
                except TemplateError as exc:
                    problems.append(exc.message)
        if problems:
            raise TemplateError("; ".join(problems))
        return cls(templates)

    def get(self, template_id: str) -> Template:
        try:
            return self.templates[template_id]
        except KeyError:
            raise UsageError(f"no template {template_id!r}") from None

    def chain(self, task_type: str, language: str | None) -> list[tuple[Cell, list[Template]]]:
        """The fallback chain of a task: specific, language-generic, universal; each level
        with its templates (some may be empty)."""
        cells = [Cell(task_type, language)] if language is not None and task_type != GENERAL else []
        if task_type != GENERAL:
            cells.append(Cell(task_type, None))
        cells.append(Cell(GENERAL, None))
        return [
            (
                cell,
                [
                    t
                    for t in self.templates.values()
                    if (t.task_type, t.language) == (cell.task_type, cell.language)
                ],
            )
            for cell in cells
        ]

    def candidates(self, task_type: str, language: str | None, *, planned: bool = False) -> list[Template]:
        """Every template a task may use, the most specific first: those with sub-tasks, or
        (``planned``) those whose sub-tasks a planner model makes."""
        found = [
            t
            for _, level in self.chain(task_type, language)
            for t in level
            if (t.planner is not None) == planned
        ]
        if not found:
            kind = "with a planner" if planned else "with sub-tasks"
            raise UsageError(f"no template {kind} for {task_type} in {language or 'any language'}")
        return found


__all__ = [
    "GENERAL",
    "PLACEHOLDERS",
    "Cell",
    "Library",
    "Planner",
    "SubTask",
    "Template",
    "TemplateError",
    "load_template",
    "parse_template",
    "render",
    "shipped",
]
