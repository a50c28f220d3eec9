"""The DSX Flex client and the DSX BMS meter from their config sections (keys read from files here)."""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from gateway.config import DsxBusConfig, DsxFlexConfig, DsxMeterConfig
from gateway.errors import ConfigError
from gateway.interfaces import AuditSink
from protocols.dsx import contract as c
from protocols.dsx.bms_meter import BmsSettings, DsxBmsMeter
from protocols.dsx.codec import Codec
from protocols.dsx.flex_client import DsxFlexClient, FlexSettings
from protocols.dsx.flex_state import FeedLimits
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import BrokerParams


def _read(source: str, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(source, key, f"cannot read {path}: {err.strerror}") from err


def broker_params(cfg: DsxBusConfig, section: str, default_client_id: str, source: str = "<config>") -> BrokerParams:
    """Return the broker connection of a DSX section; raise ConfigError naming the key at fault."""
    password = None
    username = None
    if cfg.oauth_token_file is not None:
        token_file = cfg.oauth_token_file
        _read(source, f"{section}.oauth_token_file", token_file)  # readable now; read again at each connection
        username = "oauthtoken"

        def password() -> str:
            return Path(token_file).read_text().strip()

    try:
        return BrokerParams.from_url(
            cfg.broker_url,
            cfg.client_id or default_client_id,
            ca_file=cfg.ca_file,
            client_cert=cfg.client_cert,
            client_key=cfg.client_key,
            username=username,
            password=password,
            keepalive_s=cfg.keepalive_s,
        )
    except (ValueError, OSError) as err:
        raise ConfigError(source, f"{section}.broker_url", str(err)) from err


def flex_client_from_config(
    cfg: DsxFlexConfig, audit: AuditSink, clock: Clock, source: str = "<config>"
) -> DsxFlexClient:
    """Return the DSX Flex client (not started) for the ``[dsxflex]`` section."""
    if cfg.signing_key is None or cfg.signing_kid is None:
        raise ConfigError(source, "dsxflex.signing_key", "signing_key and signing_kid are required")
    try:
        signer = Signer.from_pem(_read(source, "dsxflex.signing_key", cfg.signing_key), cfg.signing_kid)
    except ValueError as err:
        raise ConfigError(source, "dsxflex.signing_key", str(err)) from err
    keyring = KeyRing()
    for table, role in (("agent_keys", c.Role.AGENT), ("infra_keys", c.Role.INFRA)):
        for kid, path in getattr(cfg, table).items():
            try:
                keyring.add(kid, _read(source, f"dsxflex.{table}.{kid}", path), role)
            except ValueError as err:
                raise ConfigError(source, f"dsxflex.{table}.{kid}", str(err)) from err
    codec = Codec(
        c.Role.ISV,
        cfg.identifier,
        signer,
        keyring,
        clock,
        max_age_s=cfg.max_message_age_s,
        max_skew_s=cfg.max_clock_skew_s,
    )
    settings = FlexSettings(
        isv_id=cfg.identifier,
        agent_id=cfg.agent_identifier,
        feeds=tuple(FeedLimits(f.tag, f.min_w, f.max_w) for f in cfg.feeds),
        infra_ids=tuple(cfg.infra_identifiers),
        lease_s=cfg.lease_s,
        renew_s=cfg.renew_s,
        best_effort=cfg.best_effort,
        heartbeat_timeout_s=cfg.heartbeat_timeout_s,
        publish_timeout_s=cfg.publish_timeout_s,
    )
    broker = broker_params(cfg, "dsxflex", f"drgw-isv-{cfg.identifier}", source)
    return DsxFlexClient(settings, broker, codec, audit, clock)


def bms_meter_from_config(
    cfg: DsxMeterConfig, device_id: str, audit: AuditSink, clock: Clock, source: str = "<config>"
) -> DsxBmsMeter:
    """Return the DSX BMS meter (not started) for the ``[meter.dsx]`` section."""
    settings = BmsSettings(
        integration=cfg.integration,
        object_id=cfg.object_id,
        tag_path=cfg.tag_path,
        bms_object_id=cfg.bms_object_id,
        stale_s=cfg.stale_s,
        heartbeat_s=cfg.heartbeat_s,
        bms_heartbeat_timeout_s=cfg.bms_heartbeat_timeout_s,
        max_w=cfg.max_w,
        device_id=device_id,
    )
    broker = broker_params(cfg, "meter.dsx", f"drgw-bms-{cfg.integration}", source)
    return DsxBmsMeter(settings, broker, audit, clock)
