"""The one YAML reader of the project: recipes (``--config``), ``key=value`` overrides and the
``config.yaml`` a run reads back all go through :func:`load_yaml` / :func:`read_yaml_file`.

YAML is read as data only, within limits, and every failure is one :class:`ConfigError` line:

* no tag constructs anything: any explicit tag (``!!python/object/apply:os.system``, ``!!binary``,
  ``!custom``) is refused before construction; dates stay strings (no implicit timestamps);
* aliases are bounded: the document's size with every alias expanded is counted before anything
  is constructed, so an alias bomb ("billion laughs": 9 levels of 9 aliases, ~4e8 values from 1 KB)
  is refused in milliseconds instead of filling memory (or a 300 MB error line); an alias inside
  its own anchor (a recursive structure) is refused too;
* nesting is bounded (:data:`MAX_DEPTH`), so a deep ``[[[[...`` is an error, not a RecursionError;
* text is bounded (:data:`MAX_BYTES`): a recipe is a page of options, not a data file;
* a key given twice in one mapping is refused (PyYAML keeps the last one silently).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from rwkvtune.bounds import clip as _short
from rwkvtune.errors import ConfigError
from rwkvtune.utils import not_found, read_error

MAX_BYTES = 1 << 20  # 1 MiB of YAML text: recipes are a few KB
MAX_NODES = 100_000  # values (scalars, lists, mappings) with every alias expanded
MAX_DEPTH = 64  # nesting of lists and mappings
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


def _at(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses tags, bounds aliases and nesting, and refuses duplicate keys."""

    # SafeLoader's implicit types less timestamps: `2024-01-01` stays the string it reads as.
    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!":  # "!" is the non-specific tag of a quoted scalar
            raise ConfigError(f"YAML tag {_short(tag)!r}{_at(event.start_mark)} is not accepted (tags could construct "
                              f"objects); write the plain value")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_DEPTH} levels{_at(event.start_mark)}; a recipe is a "
                                  f"mapping of option: value")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)  # before any value is constructed
        return node

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" keys may be overridden by the mapping's own
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first is not None:
                raise ConfigError(f"duplicate key {_short(repr(key))} on lines {first} and {line}; keep only one of "
                                  f"them")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root) -> None:
    """ConfigError when ``root`` (a composed node graph: an alias is the anchored node itself,
    shared) holds more than MAX_NODES values once every alias is expanded, or a cycle. Each node
    is visited once (sizes memoised), so the check is linear in the text, whatever it expands to."""
    if root is None:
        return
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > MAX_NODES:
                raise ConfigError(f"{_top_key(root, node, on_path)}the YAML{_at(node.start_mark)} expands to more than {MAX_NODES:,} values through "
                                  f"its aliases (*name); write the values out instead of nesting aliases")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"the YAML alias{_at(node.start_mark)} refers to a mapping or list that contains it (a "
                              f"recursive structure); write the values out")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _top_key(root, node, on_path: set[int]) -> str:
    """"KEY: " of the top-level mapping entry being expanded (where ``node`` lies), else ""."""
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if (v is node or id(v) in on_path) and isinstance(k, yaml.ScalarNode):
                return f"{_short(k.value)}: "
    return ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """" at line L, column C: problem (context)" from PyYAML's marks (0-based; shown 1-based)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None or not getattr(e, "problem", None):
        return f" ({_short(str(e).splitlines()[0], 200)})"
    text = f"{_at(mark)}: {e.problem}"
    if getattr(e, "context", None):
        start = e.context_mark
        where = f" that starts{_at(start)}" if start else ""
        text += f" ({e.context}{where})"
    return text


def load_yaml(text: str, where: str, advice: str = "fix it") -> Any:
    """``text`` parsed as YAML data (None for an empty document); any problem is one
    ConfigError line "WHERE: problem; ADVICE" (``where`` names the file or the option)."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters of YAML, more than the {MAX_BYTES:,} read; a recipe is "
                          f"a mapping of option: value")
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as e:  # the loader's own, which does not know where the text came from
        raise ConfigError(f"{where}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML{_yaml_problem(e)}; {advice}") from e
    except RecursionError as e:  # not expected with MAX_DEPTH; kept as the last line of defence
        raise ConfigError(f"{where}: nested deeper than the YAML reader's recursion limit; {advice}") from e


def read_yaml_file(path: str | os.PathLike, what: str, advice: str) -> Any:
    """The YAML data of the file ``path`` (``what`` it is, e.g. "recipe"; ``advice``: what to do
    when it is missing or unreadable), read with the limits of :func:`load_yaml`."""

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; {advice}")
    if not p.is_file():
        raise ConfigError(not_found(p, what, advice))
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise read_error(p, e, ConfigError, f"the {what}") from e
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{p}: larger than the {MAX_BYTES:,} bytes a {what} may have; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid UTF-8 (byte {e.start}); save the {what} as UTF-8 text") from e
    return load_yaml(text, str(p), "fix the file")
