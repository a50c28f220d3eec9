"""Check everything `drgw run` loads before it starts (files, maps, keys), without touching the network.

`drgw check-config` (the unit's ``ExecStartPre``) and `drgw run` both ask ``startup_problems``, so
check-config refuses what run would refuse, one ``ConfigError`` (file, key, reason) per problem.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from gateway.config import GatewayConfig
from gateway.errors import AuditError, ConfigError

Check = Callable[[GatewayConfig, str], list[ConfigError]]


def _audit(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Check the database URL, the signing key, the checkpoint folder and the measurement journal."""
    from gateway.audit.urls import normalise_db_url

    a = cfg.audit
    problems = []
    try:
        normalise_db_url(a.db_url)
    except AuditError as err:
        problems.append(ConfigError(source, "audit.db_url", str(err)))
    if a.signing_key is not None:
        from gateway.audit.signing import Signer

        try:
            Signer.load(a.signing_key)
        except AuditError as err:
            problems.append(ConfigError(source, "audit.signing_key", str(err)))
    if a.checkpoint_dir is not None:
        folder = Path(a.checkpoint_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            problems.append(ConfigError(source, "audit.checkpoint_dir", f"{folder} exists and is not a folder"))
    if a.measurement_journal not in ("auto", "off"):
        journal = Path(a.measurement_journal)
        if journal.is_dir():
            problems.append(ConfigError(source, "audit.measurement_journal", f"{journal} is a folder, not a file"))
        elif not journal.parent.is_dir():
            problems.append(ConfigError(source, "audit.measurement_journal", f"no folder {journal.parent}"))
    return problems


def _openadr_tls(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Load the VEN's certificate, key, CA file and ciphers the way its TLS context and signer will (3.1: its
    secrets, webhook certificate and TLS context too)."""
    o = cfg.openadr
    if o.version == "3.1":
        from protocols.openadr3.preflight import config_problems

        return config_problems(o, source)
    if not (o.client_cert or o.ca_file or o.ciphers):
        return []
    from protocols.openadr.tls import client_context

    try:
        client_context(o)
    except ConfigError as err:
        return [ConfigError(source, err.key, err.reason)]
    return []


def _management(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Load the operator token file and the endpoint's TLS certificate, key and client CA as it will."""
    m = cfg.management
    if not m.enabled:
        return []
    from protocols.mgmt.auth import read_tokens, server_tls

    problems = []
    for key, load in (
        ("management.token_file", lambda: m.token_file and read_tokens(m.token_file)),
        ("management.tls_cert", lambda: m.tls_cert and m.tls_key and server_tls(m.tls_cert, m.tls_key, m.client_ca)),
    ):
        try:
            load()
        except ConfigError as err:
            problems.append(ConfigError(source, err.key or key, f"{err.path}: {err.reason}"))
    return problems


def _files(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Check that every ``*_file`` key (password, token...) names a readable file."""
    problems = []

    def walk(section: BaseModel, prefix: str) -> None:
        for name in type(section).model_fields:
            value = getattr(section, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            elif name.endswith("_file") and isinstance(value, str):
                try:
                    with Path(value).expanduser().open("rb"):
                        pass
                except OSError as err:
                    problems.append(ConfigError(source, key, f"cannot read {value}: {err.strerror}"))

    walk(cfg, "")
    return problems


CHECKS: tuple[Check, ...] = (_audit, _openadr_tls, _management, _files)


async def startup_problems(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Return every reason `drgw run` would refuse to start with ``cfg`` (empty when it would start)."""
    from gateway.compose import equipment_problems  # device drivers: maps, roles, OPC UA files

    found = [problem for check in CHECKS for problem in check(cfg, source)]
    found += await equipment_problems(cfg, source)  # its Modbus clients need a running event loop
    problems: list[ConfigError] = []
    for problem in found:
        if all((problem.path, problem.key) != (seen.path, seen.key) for seen in problems):
            problems.append(problem)
    return problems
