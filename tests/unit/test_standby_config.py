"""The [standby] section: typed, bounded, refused on SQLite; each error names its key."""

from __future__ import annotations

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError

PG = {"audit": {"db_url": "postgresql+asyncpg://drgw@db.example/drgw"}}


def test_standby_is_off_by_default_and_its_defaults_fit_together() -> None:
    cfg = parse_config({}).standby
    assert (cfg.enabled, cfg.node_name, cfg.lease_s, cfg.margin_s, cfg.takeover_s) == (False, "", 6.0, 1.5, 10.0)
    on = parse_config({**PG, "standby": {"enabled": True, "node_name": "gw-a"}}).standby
    assert on.enabled and on.node_name == "gw-a"


@pytest.mark.parametrize(
    ("standby", "key", "reason"),
    [
        ({"enabled": True}, "standby.node_name", "must be set when standby is enabled"),
        ({"node_name": "gw a"}, "standby.node_name", "should match pattern"),
        ({"node_name": "-gw"}, "standby.node_name", "should match pattern"),
        ({"lease_s": 0.5}, "standby.lease_s", "greater than or equal to 1"),
        ({"lease_s": 2.0}, "standby.margin_s", "1.5 must be at most half of lease_s 2"),
        ({"lease_s": 6.0, "margin_s": 3.5}, "standby.margin_s", "at most half of lease_s 6"),
        ({"margin_s": 0.0}, "standby.margin_s", "greater than 0"),
        ({"lease_s": 9.0}, "standby.takeover_s", "10 is too short for lease_s 9"),
        ({"lease_s": 3.0, "margin_s": 1.0, "takeover_s": 3.9}, "standby.takeover_s", "too short for lease_s 3"),
        ({"takeover_s": "10"}, "standby.takeover_s", "valid number"),
        ({"enabled": True, "node_name": "a", "extra": 1}, "standby.extra", "unknown key"),
    ],
)
def test_bad_standby_settings_name_the_key(standby: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**PG, "standby": standby}, "gw.toml")
    assert (exc.value.path, exc.value.key) == ("gw.toml", key)
    assert reason in exc.value.reason


@pytest.mark.parametrize(
    "db_url", ["sqlite+aiosqlite:////var/lib/drgw/audit.db", "sqlite:///x.db", "/var/lib/drgw/audit.db"]
)
def test_standby_is_refused_with_a_sqlite_audit_database(db_url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"audit": {"db_url": db_url}, "standby": {"enabled": True, "node_name": "gw-a"}}, "gw.toml")
    assert exc.value.key == "standby.enabled"
    assert "PostgreSQL" in exc.value.reason and "one writer" in exc.value.reason


def test_standby_off_on_sqlite_is_fine() -> None:
    assert not parse_config({"standby": {"node_name": "gw-a"}}).standby.enabled
