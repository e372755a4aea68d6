"""TaskTypes: the custom task types a process runs, by name, loaded from configuration."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from server.backends.local import Handler
from server.clock import Clock
from server.model.errors import FieldViolation

from .adapter import LoadedHandler
from .loader import load_handler
from .spec import TaskTypeConfigError, TaskTypeSpec, check_name, spec_from_mapping

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskType:
    """One loaded custom type: its spec and its adapted handler (which holds the schemas)."""

    spec: TaskTypeSpec
    handler: LoadedHandler

    @property
    def name(self) -> str:
        return self.spec.name

    def validate_input(
        self, data: Mapping[str, Any], field: str = "task.custom"
    ) -> list[FieldViolation]:
        """What in a submitted input breaks the type's input schema, each violation with
        its field path (`task.custom.items[0].name`); empty when the input is valid."""
        return self.handler.input_violations(data, field)


class TaskTypes(Mapping[str, TaskType]):
    """The loaded custom types of one process, by name. Load once, hand `handlers()` to
    every in-process executor, and `aclose()` after they have stopped (or `async with`)."""

    def __init__(self, types: Iterable[TaskType] = ()) -> None:
        self._types = {t.name: t for t in types}

    @classmethod
    def load(cls, specs: Iterable[TaskTypeSpec], clock: Clock | None = None) -> TaskTypes:
        """Loads every spec; raises one TaskTypeConfigError listing every problem of every
        type, so a configuration is fixed in one round."""
        problems: list[str] = []
        loaded: list[TaskType] = []
        seen: set[str] = set()
        for spec in specs:
            if (bad_name := check_name(spec.name)) is not None:
                problems.append(f"{spec.where}: {bad_name}")
                continue
            if spec.name in seen:
                problems.append(f"{spec.where}: defined twice")
                continue
            seen.add(spec.name)
            try:
                loaded.append(TaskType(spec, load_handler(spec, clock)))
            except TaskTypeConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise TaskTypeConfigError(problems)
        return cls(loaded)

    @classmethod
    def from_tables(
        cls, tables: Mapping[str, object], base_dir: Path, clock: Clock | None = None
    ) -> TaskTypes:
        """Reads and loads the `[task_types]` tables of a TOML configuration file, e.g.

            [task_types.summarize]
            handler = "examples.summarize:summarize"
            input_schema_file = "examples/summarize.input.schema.json"

        Schema files are relative to `base_dir`, the configuration file's directory."""
        problems: list[str] = []
        specs: list[TaskTypeSpec] = []
        for name, table in tables.items():
            if not isinstance(table, Mapping):
                problems.append(f"task_types.{name}: must be a table")
                continue
            try:
                specs.append(spec_from_mapping(name, table, base_dir))
            except TaskTypeConfigError as exc:
                problems.extend(exc.problems)
        try:
            loaded = cls.load(specs, clock)
        except TaskTypeConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise TaskTypeConfigError(problems)
        return loaded

    def __getitem__(self, name: str) -> TaskType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def handlers(self) -> dict[str, Handler]:
        """Handlers by type name, for LocalBackend (with the built-in ones)."""
        return {name: t.handler for name, t in self._types.items()}

    async def aclose(self) -> None:
        """Closes every handler, last loaded first; safe to call twice. A failing
        `aclose()` is logged and does not keep the others open."""
        for task_type in reversed(self._types.values()):
            try:
                await task_type.handler.aclose()
            except Exception:  # noqa: BLE001 - one user's cleanup bug must not skip the rest
                _log.exception("closing the handler of task type %s failed", task_type.name)

    async def __aenter__(self) -> TaskTypes:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
