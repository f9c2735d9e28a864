"""Structured output: what `json_schema=`, `regex=`, `grammar=` and OpenAI's `response_format` mean, in one place.

`constraint_from` turns them into one (kind, text) pair, which the engine (rust/src/constraint.rs) and the
reference (candlewick.reference.constraints) both compile with llguidance:

    constraint_from(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
        -> ("json_schema", '{"type": "object", ..., "x-guidance": {...}}')   (the layout: JSON_LAYOUT below)
    constraint_from(response_format={"type": "json_object"})     -> ("json_schema", '{"type": "object", ...}')
    constraint_from(regex=r"\\d{3}-\\d{4}")                        -> ("regex", "\\d{3}-\\d{4}")
    constraint_from(grammar='start: "yes" | "no"')                 -> ("grammar", 'start: "yes" | "no"')

A JSON schema may be a dict, its JSON text, True (any JSON value) or a pydantic model class. A grammar is Lark, as
llguidance reads it (`%json {...}` embeds a schema; docs/structured.md has the dialect). Pure Python, so the
reference and the server import it without the native extension.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from .errors import InvalidArgument

ANY_JSON_OBJECT = {"type": "object"}


def schema_of(x: Any, what: str = "json_schema") -> Any:
    """A JSON schema (dict or bool) from a dict, JSON text, a bool or a pydantic model class."""
    if isinstance(x, type) and hasattr(x, "model_json_schema"):
        return x.model_json_schema()
    if isinstance(x, str):
        try:
            x = json.loads(x)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if isinstance(x, bool) or isinstance(x, Mapping):
        return dict(x) if isinstance(x, Mapping) else x
    raise InvalidArgument(f"{what} must be a JSON schema (a dict, its JSON text, or a pydantic model class), "
                          f"got {type(x).__name__}")


def schema_of_response_format(rf: Any) -> Any | None:
    """The JSON schema OpenAI's `response_format` asks for: None for {"type": "text"}; any JSON object for
    {"type": "json_object"}; the schema of {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    (without "schema", any JSON object). A pydantic model class stands for its own json_schema format."""
    if isinstance(rf, type) and hasattr(rf, "model_json_schema"):
        return rf.model_json_schema()
    if not isinstance(rf, Mapping):
        raise InvalidArgument(f"response_format must be an object with a \"type\", got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidArgument('response_format: type "json_schema" needs a "json_schema" object '
                                  '({"name": ..., "schema": {...}})')
        if "schema" not in spec or spec["schema"] is None:
            return ANY_JSON_OBJECT
        return schema_of(spec["schema"], "response_format.json_schema.schema")
    raise InvalidArgument(f"response_format: type {kind!r} is not one of \"text\", \"json_object\", \"json_schema\"")


# How constrained JSON is spaced: as json.dumps writes it (", " and ": "), with no other whitespace. llguidance's
# own default lets the model put any whitespace between tokens, which models with random or weak weights fill
# with spaces until max_new_tokens. A schema's own "x-guidance" object overrides this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Numbers get bounds where the schema sets none: the integers every JSON parser reads exactly (JavaScript's safe
# integers) and, for numbers, at most 10 digits after the point (multipleOf 1e-10, which a decimal literal with
# 10 digits or fewer always is; llguidance takes no finer multipleOf). Without them a model may write digits
# until max_new_tokens ("1.0000..."): llama.cpp's grammars likewise allow 16 digits before and after the point.
SAFE_INTEGER = 2**53 - 1
FRACTION_DIGITS = 10


def bound_numbers(schema: Any) -> Any:
    """A copy of `schema` whose integer and number types without a lower or upper bound get +-SAFE_INTEGER
    there, and whose number types without multipleOf get multipleOf 1e-10 (at most 10 fraction digits)."""
    if isinstance(schema, list):
        return [bound_numbers(x) for x in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else bound_numbers(v)) for k, v in schema.items()}
    types = out.get("type")
    kind = types[0] if isinstance(types, list) and len(types) == 1 else types
    if kind in ("integer", "number"):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    if kind == "number" and "multipleOf" not in out:
        out["multipleOf"] = float(f"1e-{FRACTION_DIGITS}")
    return out


def with_layout(schema: Any) -> Any:
    """`schema` as the engine compiles it: JSON_LAYOUT as its "x-guidance" options (unless it has its own),
    numbers bounded (bound_numbers); `true` becomes {}."""
    if schema is True:
        schema = {}
    if schema is False:
        raise InvalidArgument("json_schema is false: no output can satisfy it")
    schema = bound_numbers(schema)
    if "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": JSON_LAYOUT}


def constraint_from(*, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                    response_format: Any = None) -> tuple[str, str] | None:
    """The one constraint these ask for, as (kind, text); None when none is given. At most one may be given."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                  ("response_format", response_format)) if v is not None]
    if len(given) > 1:
        raise InvalidArgument(f"give at most one of json_schema, regex, grammar and response_format; got {given}")
    if json_schema is not None:
        return "json_schema", json.dumps(with_layout(schema_of(json_schema)))
    if response_format is not None:
        schema = schema_of_response_format(response_format)
        return None if schema is None else ("json_schema", json.dumps(with_layout(schema)))
    for kind, value in (("regex", regex), ("grammar", grammar)):
        if value is not None:
            if not isinstance(value, str):
                raise InvalidArgument(f"{kind} must be a string, got {type(value).__name__}")
            if not value:
                raise InvalidArgument(f"{kind} must not be empty")
            return kind, value
    return None


CONSTRAINT_PARAMS = ("json_schema", "regex", "grammar", "response_format")

__all__ = ["constraint_from", "schema_of", "with_layout", "bound_numbers", "JSON_LAYOUT", "SAFE_INTEGER", "FRACTION_DIGITS", "schema_of_response_format", "CONSTRAINT_PARAMS", "ANY_JSON_OBJECT"]
