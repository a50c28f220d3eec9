"""The base every config section shares, and the field types (URLs, hosts) several sections use."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

# The most a number may be, by the unit its key's name ends in (units live in names). Values past
# these are typos or attacks, and some would overflow a timer or a date at run time. A key may set a
# tighter bound of its own; any other number is bounded by ANY_NUMBER_MAX.
UNIT_MAX: tuple[tuple[str, float, str], ...] = (
    ("_w_per_s", 1e12, "1e12 W/s"),
    ("_wh", 1e13, "1e13 Wh"),
    ("_w", 1e12, "1e12 W (1 TW)"),
    ("_s", 366 * 86_400.0, "366 days"),
)
ANY_NUMBER_MAX = 1e15


def _number_bound(name: str, value: Any) -> str | None:
    """Return why a number under key ``name`` is out of any sensible range, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                if (why := _number_bound("", item)) is not None:
                    return why
        return None
    for suffix, most, text in UNIT_MAX:
        if name.endswith(suffix):
            return None if abs(value) <= most else f"{value:g} is beyond any sensible value (at most {text})"
    return None if abs(value) <= ANY_NUMBER_MAX else f"{value:g} is beyond any sensible value"


class _Section(BaseModel):
    # Strict: a number must be written as a number (not "1.5", not true); no inf or nan anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _sensible(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse a number beyond what its key's unit can sensibly mean (every section, every key)."""
        why = _number_bound(info.field_name or "", value)
        if why is not None:
            raise ValueError(why)
        return value


def _url_of(*schemes: str) -> AfterValidator:
    """Return a validator of a URL with one of ``schemes`` and a host."""

    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL with a host")
        return value

    return AfterValidator(check)


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _host(value: str) -> str:
    """Return ``value`` if it is an IP address or a host name; raise ValueError otherwise."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST_NAME.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


def is_loopback(host: str) -> bool:
    """Return whether binding ``host`` keeps a listener on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


HttpUrl = Annotated[str, _url_of("http", "https")]
Host = Annotated[str, AfterValidator(_host)]
