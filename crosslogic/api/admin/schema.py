"""The admin API's request shapes, as JSON Schema (the subset OpenAPI 3.1 uses), and the one checker of them.

Every route declares its query parameters and body with these helpers; the same declarations build
/openapi.json and validate requests, so the document cannot drift from what the server accepts (a schemathesis
run in tests/test_admin_fuzz.py holds the server to it). A request that does not match is a 400 naming the
offending parameter, never a 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crosslogic import errors
from crosslogic.store.tenancy import as_uuid

Schema = dict[str, Any]
# Postgres integer / bigint bounds: a value past them would be a database error, so the schema refuses it first.
INT32 = 2**31 - 1
INT64 = 2**63 - 1


def string(max_length: int = 200, *, enum: list[str] | None = None, fmt: str | None = None,
           min_length: int = 0, pattern: str | None = None) -> Schema:
    s: Schema = {"type": "string", "maxLength": max_length}
    if min_length:
        s["minLength"] = min_length
    if enum is not None:
        s = {"type": "string", "enum": enum}
    if fmt is not None:
        s["format"] = fmt
    if pattern is not None:
        s["pattern"] = pattern
    return s


def integer(minimum: int = 0, maximum: int = INT32) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def number(minimum: float = 0, maximum: float = 1e12) -> Schema:
    return {"type": "number", "minimum": minimum, "maximum": maximum}


def boolean() -> Schema:
    return {"type": "boolean"}


def nullable(s: Schema) -> Schema:
    return {"anyOf": [s, {"type": "null"}]}


def array(items: Schema, max_items: int = 50) -> Schema:
    return {"type": "array", "items": items, "maxItems": max_items}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), *, free: Schema | None = None) -> Schema:
    s: Schema = {"type": "object", "properties": properties, "additionalProperties": free or False}
    if required:
        s["required"] = list(required)
    return s


UUID = string(36, fmt="uuid")
DATETIME = string(40, fmt="date-time")
NAME = string(100, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Param:
    name: str
    schema: Schema
    required: bool = False
    description: str = ""
    where: str = "query"  # or "path"


@dataclass(frozen=True)
class Body:
    schema: Schema
    required: bool = True


@dataclass(frozen=True)
class Checked:
    """A request's parameters and body, converted: date-times as datetime, the rest as JSON gives them."""

    params: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str) -> errors.ClientError:
    return errors.invalid_param(message, param, "invalid_value")


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list,
                              "null": type(None)}[expected])


def check(value: Any, schema: Schema, where: str) -> Any:
    """`value` if it matches `schema` (date-time strings come back as datetime); raises a 400 otherwise."""
    if "anyOf" in schema:
        problems = []
        for option in schema["anyOf"]:
            try:
                return check(value, option, where)
            except errors.ClientError as exc:
                problems.append(exc.message)
        raise _bad(problems[0], where)
    expected = schema["type"]
    if expected == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema: 1.0 is an integer
    if not _type_ok(value, expected):
        raise _bad(f"{where} must be of type {expected}", where)
    if expected == "string":
        return _check_string(value, schema, where)
    if expected in ("integer", "number"):
        if not schema.get("minimum", -INT64) <= value <= schema.get("maximum", INT64):
            raise _bad(f"{where} must be between {schema['minimum']} and {schema['maximum']}", where)
        return value
    if expected == "array":
        if len(value) > schema.get("maxItems", 1000):
            raise _bad(f"{where} has more than {schema['maxItems']} items", where)
        return [check(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    if expected == "object":
        return _check_object(value, schema, where)
    return value


def _check_string(value: str, schema: Schema, where: str) -> Any:
    if "enum" in schema and value not in schema["enum"]:
        raise _bad(f"{where} must be one of {', '.join(schema['enum'])}", where)
    if len(value) > schema.get("maxLength", 10_000) or len(value) < schema.get("minLength", 0):
        raise _bad(f"{where} must be {schema.get('minLength', 0)} to {schema['maxLength']} characters", where)
    if "pattern" in schema and not re.search(schema["pattern"], value):
        raise _bad(f"{where} must match {schema['pattern']}", where)
    if schema.get("format") == "uuid":
        if as_uuid(value) is None:
            raise _bad(f"{where} must be a UUID", where)
    elif schema.get("format") == "date-time":
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise _bad(f"{where} must be an RFC 3339 date-time (e.g. 2027-01-01T00:00:00Z)", where) from None
        if parsed.tzinfo is None:
            raise _bad(f"{where} needs a time zone (e.g. 2027-01-01T00:00:00Z)", where)
        return parsed
    return value


def _check_object(value: dict, schema: Schema, where: str) -> dict:
    properties = schema.get("properties", {})
    free = schema.get("additionalProperties", False)
    out = {}
    for name in schema.get("required", []):
        if name not in value:
            raise errors.invalid_param(f"{where}.{name} is required", f"{where}.{name}" if where != "body" else name,
                                       "missing_required_parameter")
    for name, item in value.items():
        path = name if where == "body" else f"{where}.{name}"
        if name in properties:
            out[name] = check(item, properties[name], path)
        elif free:
            out[name] = check(item, free, path)
        else:
            raise errors.invalid_param(f"unknown parameter {path}", path, "unknown_parameter")
    return out


def query_value(raw: str, schema: Schema) -> Any:
    """A query string's text as the schema's type ("5" -> 5), before `check`."""
    base = schema["anyOf"][0] if "anyOf" in schema else schema
    if base["type"] == "integer":
        try:
            return int(raw)
        except ValueError:
            return raw
    if base["type"] == "boolean":
        return {"true": True, "false": False}.get(raw, raw)
    return raw
