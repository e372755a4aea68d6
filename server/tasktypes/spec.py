"""What configuration says about a custom task type, read from a `[task_types.<name>]` table."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.model.task import CHAT, EMBED

BUILTIN_TYPES = frozenset({CHAT, EMBED})
# Names travel in TaskSpec.type, metrics labels and log lines: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEYS = (
    "handler",
    "input_schema",
    "input_schema_file",
    "output_schema",
    "output_schema_file",
    "options",
)


class TaskTypeConfigError(Exception):
    """Custom task types that cannot be loaded. `problems` holds one "where: what to fix"
    line each, `where` being the configuration key (`task_types.summarize.handler`), so the
    server can report them with the rest of its configuration and refuse to start."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid task types:\n  " + "\n  ".join(problems))


@dataclass(frozen=True, slots=True)
class TaskTypeSpec:
    """A custom task type as configured; `load_handler` turns it into a running handler.

    `handler` is "package.module:attribute". `options` are keyword arguments for the
    constructor of a class handler (a function handler takes none)."""

    name: str
    handler: str
    input_schema: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The configuration key of this type, for error messages."""
        return f"task_types.{self.name}"


def check_name(name: str) -> str | None:
    """What is wrong with `name` as a custom task type's name, or None."""
    if name in BUILTIN_TYPES:
        return f"{name!r} is a built-in task type; choose another name"
    if not _NAME.fullmatch(name):
        return "a name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    return None


def spec_from_mapping(name: str, table: Mapping[str, Any], base_dir: Path) -> TaskTypeSpec:
    """The spec of `[task_types.<name>]` as read from TOML. Schema files are read relative
    to `base_dir` (the configuration file's directory). Raises TaskTypeConfigError listing
    every problem of the table."""
    where = f"task_types.{name}"
    problems: list[str] = []
    if (bad_name := check_name(name)) is not None:
        problems.append(f"{where}: {bad_name}")
    for key in sorted(set(table) - set(_KEYS)):
        close = difflib.get_close_matches(key, _KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"{where}.{key}: unknown key; {hint}expected one of {', '.join(_KEYS)}")

    handler = table.get("handler")
    if not isinstance(handler, str):
        got = "required" if handler is None else "must be a string"
        problems.append(f'{where}.handler: {got}, e.g. handler = "mypkg.handlers:summarize"')
        handler = ""
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        problems.append(f"{where}.options: must be a table of constructor arguments")
    input_schema = _schema(table, "input", where, base_dir, problems)
    output_schema = _schema(table, "output", where, base_dir, problems)
    if problems:
        raise TaskTypeConfigError(problems)
    return TaskTypeSpec(name, handler, input_schema, output_schema, dict(options))


def _schema(
    table: Mapping[str, Any], kind: str, where: str, base_dir: Path, problems: list[str]
) -> Mapping[str, Any] | None:
    """`<kind>_schema` inline or `<kind>_schema_file`; None when neither is given."""
    inline, file = table.get(f"{kind}_schema"), table.get(f"{kind}_schema_file")
    if inline is not None and file is not None:
        problems.append(f"{where}: set {kind}_schema or {kind}_schema_file, not both")
        return None
    if inline is not None:
        if not isinstance(inline, Mapping):
            problems.append(f"{where}.{kind}_schema: must be a table (a JSON Schema object)")
            return None
        return inline
    if file is None:
        return None
    key = f"{where}.{kind}_schema_file"
    if not isinstance(file, str):
        problems.append(f"{key}: must be a path to a JSON file")
        return None
    # An absolute `file` replaces base_dir.
    return _read_schema(base_dir / file, key, problems)


def _read_schema(path: Path, key: str, problems: list[str]) -> Mapping[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{key}: {path} is not valid JSON: {exc}")
        return None
    if not isinstance(loaded, dict):
        problems.append(f"{key}: {path} must hold a JSON object (a JSON Schema)")
        return None
    return loaded
