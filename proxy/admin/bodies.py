"""Bodies of the admin API's mutating calls (off the data path), validated before anything changes:
a body that is not what the call takes gets a 400 naming the field and the reason, as a config error
does — never a 500, never a half-applied change."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from proxy.obs import log
from proxy.settings.loader import validation_messages


class BadBody(Exception):
    pass


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerBody(_Body):
    state: Literal["open", "closed", "auto"]
    track: StrictStr | None = None
    model: StrictStr | None = None  # protocol: openai — that model's breaker on the track, not the track's


class LogLevelBody(_Body):
    level: Annotated[StrictStr, Field(pattern="(?i)^(" + "|".join(log.LEVELS) + ")$")]


# {"stable": 95, "canary": 5}: whole numbers only (1e999, 2.5, true and "5" are not weights)
WEIGHTS = TypeAdapter(Annotated[dict[StrictStr, Annotated[StrictInt, Field(ge=0, le=100)]], Field(min_length=1)])


def parse(kind, raw: bytes, example: str):
    """The validated body, or BadBody with one `field: reason` line per problem (`<body>` for the
    whole body) and an example of what the call takes."""
    adapter = kind if isinstance(kind, TypeAdapter) else None
    try:
        return adapter.validate_json(raw) if adapter is not None else kind.model_validate_json(raw)
    except ValidationError as exc:
        lines = [m.replace("<root>", "<body>", 1) for m in validation_messages(exc)]
        raise BadBody("; ".join(lines) + f" (expected {example})") from None
