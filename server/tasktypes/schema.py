"""JSON values and JSON Schemas of custom task types: what an input or output may hold."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from server.model.errors import FieldViolation

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
# A request whose array has 10,000 bad items gets the first few, not a 10,000-line answer.
MAX_VIOLATIONS = 50
# jsonschema puts the offending value in its messages; a 1 MB string must not be echoed.
_MAX_DESCRIPTION_CHARS = 200
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ROOT_URI = "urn:taskring:schema"


class JsonSchema:
    """A Draft 2020-12 schema, checked and compiled once, then used for every task."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        """Raises ValueError saying what is wrong with `schema`."""
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema at {exc.json_path}: {exc.message}") from exc
        if str(schema.get("$schema", DRAFT_2020_12)).rstrip("#") != DRAFT_2020_12:
            raise ValueError(f'only Draft 2020-12 is supported: "$schema" = "{DRAFT_2020_12}"')
        _check_references(schema)
        # An empty registry: a "$ref" to a URL is never fetched while a task is validated.
        # Formats ("date", "email", ...) are asserted, as a schema's author expects.
        self._validator = Draft202012Validator(
            schema, registry=Registry(), format_checker=Draft202012Validator.FORMAT_CHECKER
        )

    def violations(self, data: object, field: str) -> list[FieldViolation]:
        """What in `data` breaks the schema, each with its path under `field`
        (`task.custom.items[2].name`); empty when `data` is valid."""
        found = _violations(self._validator.iter_errors(data), field)
        problems = list(itertools.islice(found, MAX_VIOLATIONS + 1))
        if len(problems) > MAX_VIOLATIONS:
            problems[MAX_VIOLATIONS - 1 :] = [FieldViolation(field, "more violations not listed")]
        return problems


def _violations(errors: Iterable[ValidationError], field: str) -> Iterator[FieldViolation]:
    seen_required: set[tuple[str, ...]] = set()
    for error in errors:
        path = field + json_path(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            # jsonschema reports each missing property at the object that lacks it; name the
            # property itself, as a form would. The first such error lists them all.
            key = (path, *map(str, error.absolute_schema_path))
            if key in seen_required:
                continue
            seen_required.add(key)
            required = error.validator_value if isinstance(error.validator_value, list) else []
            for name in required:
                if name not in error.instance:
                    yield FieldViolation(path + json_path([name]), "required")
            continue
        yield FieldViolation(path, _shorten(error.message))


def json_path(parts: Iterable[str | int]) -> str:
    """`["items", 2, "first name"]` → `.items[2]['first name']` (the style of validate.py)."""
    text = []
    for part in parts:
        if isinstance(part, int):
            text.append(f"[{part}]")
        elif _IDENTIFIER.fullmatch(part):
            text.append(f".{part}")
        else:
            text.append(f"[{part!r}]")
    return "".join(text)


def _shorten(text: str) -> str:
    if len(text) <= _MAX_DESCRIPTION_CHARS:
        return text
    return text[: _MAX_DESCRIPTION_CHARS - 1] + "…"


def _check_references(schema: Mapping[str, Any]) -> None:
    """A "$ref" that leads nowhere fails at start, not at the first task. References are
    resolved within the schema only; subschemas with their own "$id" change the base
    (JSON Schema 2020-12, §8.2.1) and are left to validation time."""
    resource = DRAFT202012.create_resource(schema)
    uri = resource.id() or _ROOT_URI
    resolver = Registry().with_resource(uri, resource).resolver(base_uri=uri)
    for ref in _references(schema, root=True):
        try:
            resolver.lookup(ref)
        except Unresolvable as exc:
            raise ValueError(
                f'"$ref": {ref!r} cannot be resolved; only references within the schema '
                '(such as "#/$defs/name") are supported'
            ) from exc


def _references(node: object, *, root: bool = False) -> Iterator[str]:
    if isinstance(node, Mapping):
        if not root and isinstance(node.get("$id"), str):
            return
        if isinstance(ref := node.get("$ref"), str):
            yield ref
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def plain_input(data: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of a task's input for a handler: dicts and lists only, and whole
    numbers as int. protobuf's Struct carries every number as a double, so the `3` a client
    sent arrives as 3.0; handlers expect `3` (as `json.loads` would give), e.g. to slice."""
    return {key: _plain(value) for key, value in data.items()}


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_output(value: object) -> dict[str, Any]:
    """`value` as a JSON object (tuples become lists), or ValueError naming the first part
    that JSON cannot hold. The output is stored as JSON and sent as a protobuf Struct."""
    if not isinstance(value, Mapping):
        raise ValueError(f"output: must be a dict, not {type(value).__name__}")
    return _json_object(value, "output")


def _json_object(value: Mapping[object, object], path: str) -> dict[str, Any]:
    result = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: key {key!r} is not a string")
        result[key] = _json(item, path + json_path([key]))
    return result


def _json(value: object, path: str) -> object:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not a JSON number")
        return value
    if isinstance(value, Mapping):
        return _json_object(value, path)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{path}: {type(value).__name__} is not JSON (use str, list or dict)")
