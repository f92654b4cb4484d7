"""Configuration errors a person can act on (issue 10 §4).

`explain(error)` turns pydantic's ValidationError for `Settings` into one line per
bad variable, naming the *environment variable* (not the field) and what it accepts:

    FLEET_PORT='abc' is not valid: expected an integer from 1 to 65535
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import AliasChoices, ValidationError
from pydantic.fields import FieldInfo

from app.config import Settings

PREFIX = "FLEET_"


def env_name(field_name: str, field: FieldInfo | None = None) -> str:
    """The environment variable that sets `field_name` (`port` → `FLEET_PORT`)."""
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    if isinstance(alias, str):
        return alias
    return PREFIX + field_name.upper()


def _kind(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        values = ", ".join(str(v) for v in typing.get_args(annotation))
        return f"one of {values} (any case)"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else "a value"
    return {
        bool: "true or false (also 1/0, yes/no, on/off)",
        int: "an integer",
        float: "a number",
        str: "text",
    }.get(annotation, "a value")


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe_allowed(field: FieldInfo) -> str:
    """What a field accepts, in words: `an integer from 1 to 65535`, `a number greater
    than 0`, `one of debug, info, warning, error (any case)`."""
    text = _kind(field.annotation)
    low: object = None
    high: object = None
    low_strict = high_strict = False
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_strict = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high, high_strict = item.lt, True
    if low is not None and high is not None and not (low_strict or high_strict):
        return f"{text} from {_fmt(low)} to {_fmt(high)}"
    bounds = []
    if low is not None:
        bounds.append(f"greater than {_fmt(low)}" if low_strict else f"at least {_fmt(low)}")
    if high is not None:
        bounds.append(f"less than {_fmt(high)}" if high_strict else f"at most {_fmt(high)}")
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def explain(error: ValidationError, model: type[Settings] = Settings) -> str:
    """One line per invalid variable: its name, the value given, what it accepts."""
    lines = []
    for detail in error.errors():
        name = str(detail["loc"][0]) if detail["loc"] else ""
        field = model.model_fields.get(name)
        if field is None:  # an alias in `loc`
            field = next((f for n, f in model.model_fields.items()
                          if env_name(n, f) == name), None)
        variable = env_name(name, field) if field is not None else name
        allowed = describe_allowed(field) if field is not None else detail["msg"]
        custom = detail["type"] == "value_error"  # our own validators explain themselves
        reason = str(detail["ctx"]["error"]) if custom and "ctx" in detail else allowed
        lines.append(f"{variable}={detail['input']!r} is not valid: expected {reason}")
    return "\n".join(lines)
