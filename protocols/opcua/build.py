"""The OPC UA meter from config (``[meter] backend = "opcua"``), for the composition root (``gateway.compose``).

Nothing is connected here: the composition root starts what it builds.
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from gateway.config import MeterConfig, OpcuaClientConfig
from gateway.errors import ConfigError
from protocols.opcua.client import OpcuaClient, OpcuaMeter, OpcuaSecurity


def opcua_security(cfg: OpcuaClientConfig, source: str = "config") -> OpcuaSecurity:
    """Return the OPC UA client security for a config section (reads the password file)."""
    password = None
    if cfg.password_file is not None:
        try:
            password = Path(cfg.password_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(source, "meter.opcua.password_file", f"cannot read: {err.strerror}") from err

    def path(p: str | None) -> Path | None:
        return Path(p) if p is not None else None

    return OpcuaSecurity(
        mode=cfg.security,
        certificate=path(cfg.certificate),
        private_key=path(cfg.private_key),
        server_certificate=path(cfg.server_certificate),
        username=cfg.username,
        password=password,
    )


def build_opcua_meter(cfg: MeterConfig, clock: Clock, source: str = "config") -> OpcuaMeter:
    """Return the (not started) OPC UA meter of a ``[meter]`` section with ``backend = "opcua"``."""
    assert cfg.opcua is not None  # the config validator requires it
    client = OpcuaClient(
        cfg.device_id,
        cfg.opcua.url,
        cfg.opcua.node_map,
        opcua_security(cfg.opcua, source),
        timeout_s=cfg.opcua.timeout_s,
        clock=clock,
    )
    return OpcuaMeter(client)


def opcua_file_problems(cfg: MeterConfig, source: str) -> list[ConfigError]:
    """Return what is wrong with the security files an OPC UA meter section names (none without security)."""
    if cfg.backend != "opcua" or cfg.opcua is None or cfg.opcua.security == "none":
        return []
    from protocols.opcua.certs import security_file_problems

    o = cfg.opcua
    return [
        ConfigError(source, f"meter.opcua.{key}", reason)
        for key, reason in security_file_problems(o.certificate, o.private_key, o.server_certificate)
    ]
