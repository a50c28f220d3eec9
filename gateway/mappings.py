"""Reading mapping files, for every protocol that has them (Modbus register maps, OPC UA node maps).

A mapping is named by its bare file name (shipped in this package) or by a path. Each protocol
package validates the document against its own schema; what they share lives here: reading and
decoding the YAML with errors that name the file, the list of shipped maps and the protocol each
declares, and the physical range a reading or a written value must lie in.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from gateway.errors import ConfigError

PACKAGE = "mappings"


class Limit(BaseModel):
    """A range in engineering units: what a written value must lie in, or what a reading can physically be."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float
    max: float


def error_key(loc: tuple[int | str, ...]) -> str:
    """Join a pydantic error location into a dotted key."""
    return ".".join(str(part) for part in loc) or "(top level)"


def read_document(name_or_path: str | Path) -> tuple[Any, str]:
    """Return (decoded YAML, source name) for a shipped map's bare name or a file path."""
    text_name = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text_name or text_name.endswith((".yaml", ".yml"))
    try:
        if is_path:
            source = text_name
            raw = Path(name_or_path).read_text(encoding="utf-8")
        else:
            res = resources.files(PACKAGE).joinpath(f"{text_name}.yaml")
            source = f"{PACKAGE}/{text_name}.yaml"
            if not res.is_file():
                known = ", ".join(all_mapping_names()) or "none"
                raise ConfigError(source, "(file)", f"no such mapping (shipped: {known})")
            raw = res.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(text_name, "(file)", f"cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(text_name, "(file)", "not valid UTF-8") from err
    try:
        return yaml.safe_load(raw), source
    except yaml.YAMLError as err:
        raise ConfigError(source, "(syntax)", str(err).replace("\n", " ")) from err
    except RecursionError as err:
        raise ConfigError(source, "(syntax)", "mappings or lists nested too deeply") from err


def all_mapping_names() -> list[str]:
    """Return the bare names of every mapping file shipped in the ``mappings`` package, any protocol."""
    root = resources.files(PACKAGE)
    return sorted(f.name[: -len(".yaml")] for f in root.iterdir() if f.name.endswith(".yaml"))


def protocol_of(name: str) -> str:
    """Return the ``protocol`` a shipped mapping file declares (``modbus`` when it says none)."""
    data, _ = read_document(name)
    proto = data.get("protocol", "modbus") if isinstance(data, dict) else "modbus"
    return str(proto)


def names_for(protocol: str) -> list[str]:
    """Return the bare names of the shipped maps of one protocol."""
    return [n for n in all_mapping_names() if protocol_of(n) == protocol]
