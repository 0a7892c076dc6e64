"""Reading the YAML and JSON users give (plans, schedule files, LLM configs), within bounds.

A small text must not cost much to read, nor a readable one hide surprises. So:

- YAML aliases are refused: a 600-byte "billion laughs" of nested aliases stands for
  billions of values once anything walks it, while without aliases the data is no bigger
  than the text;
- the text is at most MAX_BYTES, nested at most MAX_DEPTH deep;
- integers fit in 64 bits (what the stores and most JSON readers take; Python's have no
  bound, and reading a 100,000-digit one takes long);
- NUL characters are refused (PostgreSQL cannot store them in text);
- a mapping may not name a key twice (the later one would silently win).

Each refusal is :class:`Refused`, a text that is not YAML or JSON at all :class:`Unreadable`;
both say the line where the text has one to say.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

if TYPE_CHECKING:
    from yaml._yaml import Mark as CMark  # libyaml's, which may be missing at run time

#: the longest text (in bytes of UTF-8) read from a file or a string
MAX_BYTES = 64 * 1024 * 1024
#: the deepest nesting of mappings and lists (the document itself is level 1)
MAX_DEPTH = 64
#: integers must lie in [-2**63, 2**63)
INT_BITS = 63
#: longer integer literals are refused before being converted
_MAX_INT_CHARS = 100
#: a YAML text libyaml refuses is read again by PyYAML's own parser, for its clearer
#: message (with the offending line quoted), when it is at most this long
_RETELL_CHARS = 64 * 1024
_MERGE = "tag:yaml.org,2002:merge"


class DocumentError(ValueError):
    """A text that cannot be read as the data it should hold; the message says why and where."""


class Unreadable(DocumentError):
    """The text is not YAML (or JSON) at all."""


class Refused(DocumentError):
    """The text is YAML (or JSON), but goes past a bound or holds what is refused."""


def _at(mark: Mark | CMark | None) -> str:
    return f"line {mark.line + 1}" if mark is not None else "line ?"


def _line(node: Node) -> str:
    return _at(node.start_mark)


def _int_problem(value: int, literal: str) -> str | None:
    if -(2**INT_BITS) <= value < 2**INT_BITS:
        return None
    shown = literal if len(literal) <= 24 else f"{literal[:20]}..."
    return f"integer {shown} is out of range: integers must lie within ±2**{INT_BITS}"


class _Bounds(Composer, SafeConstructor):
    """The checks, for either parser: aliases and depth while composing, keys, integers
    and NUL characters while constructing."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]
        if isinstance(event, AliasEvent):
            raise Refused(
                f"YAML aliases are not allowed (*{event.anchor}, {_at(event.start_mark)}): "
                "write the value out where it is used"
            )
        nested = isinstance(event, SequenceStartEvent | MappingStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels ({_at(event.start_mark)})")
        node = super().compose_node(parent, index)
        if nested:
            self._depth -= 1
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: the base constructor says so
                    continue
                if first is not key_node:
                    raise Refused(f"duplicate key {key!r} ({_line(key_node)}; first at {_line(first)})")
        return super().construct_mapping(node, deep)

    def construct_scalar(self, node: ScalarNode | MappingNode) -> str:
        value = super().construct_scalar(node)
        if "\x00" in value:
            raise Refused(f"NUL characters are not allowed ({_line(node)})")
        return value

    def construct_yaml_int(self, node: ScalarNode) -> int:
        literal = str(node.value)
        if len(literal) > _MAX_INT_CHARS:
            where = _line(node)
            raise Refused(f"integer of {len(literal)} characters ({where}): integers must fit in 64 bits")
        value = super().construct_yaml_int(node)
        problem = _int_problem(value, literal)
        if problem:
            raise Refused(f"{problem} ({_line(node)})")
        return value


class _PureLoader(_Bounds, yaml.SafeLoader):
    """PyYAML's own parser, in Python: slower, its messages clearer."""


_INT = "tag:yaml.org,2002:int"
# (the stubs bind a constructor's loader to PyYAML's own classes)
_PureLoader.add_constructor(_INT, _Bounds.construct_yaml_int)  # type: ignore[type-var]


_Loader: type[_Bounds] = _PureLoader
if yaml.__with_libyaml__:

    class _FastLoader(_Bounds, yaml.CSafeLoader):
        """libyaml's parser (several times faster) feeding the checked composer."""

        def __init__(self, stream: str) -> None:
            yaml.CSafeLoader.__init__(self, stream)
            Composer.__init__(self)

    _FastLoader.add_constructor(_INT, _Bounds.construct_yaml_int)  # type: ignore[type-var]
    _Loader = _FastLoader


def _compose(loader_class: type[_Bounds], text: str) -> tuple[Any, Node | None]:
    loader: Any = loader_class(text)  # type: ignore[call-arg]
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def _check_text(text: str) -> None:
    # a character is 1 to 4 bytes: count the bytes only when the characters do not decide
    if len(text) > MAX_BYTES or (
        len(text) * 4 > MAX_BYTES and len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES
    ):
        raise Refused(f"the text has more than {MAX_BYTES} bytes; at most {MAX_BYTES} are read")
    nul = text.find("\x00")
    if nul >= 0:
        raise Refused(f"NUL characters are not allowed (line {text.count(chr(10), 0, nul) + 1})")


def load_yaml_node(text: str) -> tuple[Any, Node | None]:
    """The data of a YAML text (a single document), and its root node (None when empty),
    whose marks say where each part starts."""
    _check_text(text)
    try:
        return _compose(_Loader, text)
    except yaml.YAMLError as exc:
        message = str(exc)
    if _Loader is not _PureLoader and len(text) <= _RETELL_CHARS:
        try:
            return _compose(_PureLoader, text)
        except yaml.YAMLError as exc:
            message = str(exc)
    raise Unreadable(f"not valid YAML: {message}")


def load_yaml(text: str) -> Any:
    """The data of a YAML text, within the bounds (Refused, Unreadable otherwise)."""
    return load_yaml_node(text)[0]


def item_lines(node: Node | None) -> list[int]:
    """The line (1-based) each item of a top-level list starts on ([] for anything else)."""
    if not isinstance(node, SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Refused(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _int(literal: str) -> int:
    if len(literal) > _MAX_INT_CHARS:
        raise Refused(f"integer of {len(literal)} digits: integers must fit in 64 bits")
    value = int(literal)
    problem = _int_problem(value, literal)
    if problem:
        raise Refused(problem)
    return value


def _check_tree(data: Any, text: str) -> None:
    """Depth and NUL characters of parsed JSON (the parser checks neither)."""
    level = [data] if type(data) in _CONTAINERS else []
    depth = 0
    while level:  # one level at a time: a comprehension each, not a call per value
        depth += 1
        if depth > MAX_DEPTH:
            raise Refused(f"nested deeper than {MAX_DEPTH} levels")
        level = [x for v in level for x in (v.values() if type(v) is dict else v) if type(x) in _CONTAINERS]
    # JSON writes a NUL only as \u0000 (a raw one inside a string is a syntax error)
    if "\\u0000" in text and _has_nul(data):
        raise Refused("NUL characters are not allowed")


_CONTAINERS = (dict, list)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def load_json(text: str) -> Any:
    """The data of a JSON text, within the bounds (Refused, Unreadable otherwise)."""
    _check_text(text)
    try:
        data = json.loads(text, object_pairs_hook=_pairs, parse_int=_int)
    except RecursionError:
        raise Refused(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise Unreadable(f"not valid JSON: {exc}") from None
    _check_tree(data, text)
    return data


def read_text(path: str | Path, limit: int = MAX_BYTES) -> str:
    """A UTF-8 file's text, refused (without reading it all) past ``limit`` bytes.

    OSError and UnicodeDecodeError are the caller's to report."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{path} has more than {limit} bytes; at most {limit} are read")
    return data.decode("utf-8")


__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "DocumentError",
    "Refused",
    "Unreadable",
    "item_lines",
    "load_json",
    "load_yaml",
    "load_yaml_node",
    "read_text",
]
