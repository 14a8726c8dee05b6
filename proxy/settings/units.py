"""Duration and size literals used across the config (`250ms`, `5s`, `1m`, `512KiB`, ...).

Parsing happens once, at config load; everything downstream sees floats (seconds) and ints (bytes).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_duration(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 250ms, 5s, 1m, 1h or a number of seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"invalid duration {value!r}: use 250ms, 5s, 1m, 1h or a number of seconds")
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return value


def parse_size(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512KiB, 1MiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"invalid size {value!r}: use 512KiB, 1MiB, 1GiB or a number of bytes")
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    return value


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(n: int) -> str:
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$"


class _Literal:
    """What the JSON Schema of the config says of a duration or size: the number the field takes (with its
    bounds) or the literal a user writes (`5s`, `64MiB`). Only `resilience-proxy config-schema` and the
    Helm chart's values.schema.json read it; validation itself is the parser above."""

    def __init__(self, pattern: str, what: str) -> None:
        self.pattern, self.what = pattern, what

    def __get_pydantic_json_schema__(self, core_schema, handler):
        return {"anyOf": [handler(core_schema), {"type": "string", "pattern": self.pattern}], "description": self.what}


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration, when_used="json"),
                     _Literal(DURATION_PATTERN, "a duration: 250ms, 5s, 1m, 1h or a number of seconds")]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, when_used="json"),
                 _Literal(SIZE_PATTERN, "a size: 512KiB, 1MiB, 1GiB or a number of bytes")]
