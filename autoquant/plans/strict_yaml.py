"""Reading YAML that someone else wrote (recipes, search spaces): plain data, bounded.

``yaml.safe_load`` already refuses tags that would build Python objects. On top of it:
- a file larger than ``MAX_BYTES`` is refused before it is parsed (parsing is slow);
- text must be UTF-8;
- nesting deeper than ``MAX_DEPTH`` is refused (instead of a RecursionError);
- anchors and aliases are refused (recipes never need them; alias "bombs" make a small file a
  huge structure);
- a mapping that repeats a key is refused, naming the key and both lines (YAML says keys are
  unique; PyYAML would silently keep the last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 2**20  # ~12,000 layer entries; Flux-dev's 504 layers take 40 KB
MAX_DEPTH = 32


class YamlProblem(ValueError):
    """What is wrong with the text; the caller names the file."""


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlProblem(f"line {event.start_mark.line + 1}: aliases (*{event.anchor}) are "
                              f"not allowed; write the value out")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise YamlProblem(f"line {event.start_mark.line + 1}: anchors (&{event.anchor}) are "
                              f"not allowed; write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlProblem(f"line {event.start_mark.line + 1}: nested deeper than "
                                  f"{MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                raise YamlProblem(f"line {key_node.start_mark.line + 1}: a mapping key must be "
                                  f"a plain value, not {type(key).__name__}") from None
            if first != key_node.start_mark.line + 1:
                raise YamlProblem(f"key {key!r} appears twice (lines {first} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def loads(text: str) -> Any:
    """Parse YAML text as plain data. Raises YamlProblem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlProblem:
        raise
    except yaml.YAMLError as e:
        raise YamlProblem(f"not valid YAML: {e}") from None
    except RecursionError:
        raise YamlProblem(f"nested deeper than {MAX_DEPTH} levels") from None


def load_file(path: str | Path) -> Any:
    """Read and parse a YAML file within the limits above. Raises YamlProblem (and OSError for
    a file that cannot be read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlProblem(f"{size / 2**20:.1f} MiB is larger than the {MAX_BYTES // 2**20} MiB "
                          f"a recipe or space may be (write repeated layers as one 're:' entry)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlProblem(f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") \
            from None
    return loads(text)
