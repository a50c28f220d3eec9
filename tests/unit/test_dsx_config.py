"""The [dsxflex] and [meter.dsx] config sections: typed, validated, built into clients by the composition root."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.compose import build_meter, equipment_problems
from gateway.config import load_config
from gateway.errors import ConfigError
from protocols.dsx import Signer, bms_meter_from_config, flex_client_from_config
from tests.dsxsite import RecordingAudit

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "gateway.example.toml"


def _write_keys(tmp_path: Path) -> tuple[Path, Path]:
    isv, agent = Signer.generate("isv-1"), Signer.generate("agent-1")
    (tmp_path / "isv.pem").write_bytes(isv.private_pem())
    (tmp_path / "agent.pem").write_bytes(agent.public_pem())
    return tmp_path / "isv.pem", tmp_path / "agent.pem"


def _flex_toml(tmp_path: Path, extra: str = "") -> Path:
    """Write a config with an enabled [dsxflex]; ``extra`` lines replace the template's lines of the same key."""
    isv, agent = _write_keys(tmp_path)
    p = tmp_path / "gw.toml"
    text = f"""
[dsxflex]
enabled = true
broker_url = "mqtt://127.0.0.1:1883"
identifier = "acme-energy"
agent_identifier = "maxlps"
signing_key = "{isv}"
signing_kid = "isv-1"
lease_s = 60.0
renew_s = 20.0
[dsxflex.agent_keys]
"agent-1" = "{agent}"
[[dsxflex.feeds]]
tag = "main-a"
min_w = 1000.0
max_w = 100000.0
"""
    for line in extra.splitlines():
        key = line.split("=")[0].strip()
        kept = [t for t in text.splitlines() if t.split("=")[0].strip() != key]
        text = "\n".join(kept).replace("[dsxflex]\n", f"[dsxflex]\n{line}\n", 1)
    p.write_text(text)
    return p


def test_example_keeps_dsx_disabled() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.dsxflex.enabled is False and cfg.meter.backend != "dsx"


def test_dsxflex_section_builds_a_client(tmp_path: Path) -> None:
    cfg = load_config(_flex_toml(tmp_path)).dsxflex
    client = flex_client_from_config(cfg, RecordingAudit(), ManualClock())
    assert client.settings.lease_s == 60.0 and [f.tag for f in client.settings.feeds] == ["main-a"]
    assert client.session.params.client_id == "drgw-isv-acme-energy"
    assert client.codec.source == "//grid/v1/isv/acme-energy"


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ("renew_s = 90.0", "dsxflex", "below lease_s"),
        ("lease_s = inf", "dsxflex.lease_s", "finite"),
        ('identifier = "a/b"', "dsxflex.identifier", "pattern"),
        ('client_cert = "c.pem"\nclient_key = "k.pem"', "dsxflex", "mqtts://"),
        ('oauth_token_file = "t"', "dsxflex", "mqtts://"),
        ("bogus = 1", "dsxflex.bogus", "unknown key"),
    ],
)
def test_bad_dsxflex_keys_are_named(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_flex_toml(tmp_path, extra))
    assert err.value.key == key and reason in err.value.reason


def test_enabled_without_keys_or_feeds_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text('[dsxflex]\nenabled = true\nsigning_key = "/x"\nsigning_kid = "k"\n')
    with pytest.raises(ConfigError, match="agent_keys is required"):
        load_config(p)


def test_unreadable_or_wrong_key_files_name_the_key(tmp_path: Path) -> None:
    cfg = load_config(_flex_toml(tmp_path)).dsxflex
    broken = cfg.model_copy(update={"signing_key": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError) as err:
        flex_client_from_config(broken, RecordingAudit(), ManualClock())
    assert err.value.key == "dsxflex.signing_key" and "cannot read" in err.value.reason
    public_only = cfg.model_copy(update={"signing_key": str(tmp_path / "agent.pem")})  # a public key cannot sign
    with pytest.raises(ConfigError) as err:
        flex_client_from_config(public_only, RecordingAudit(), ManualClock())
    assert err.value.key == "dsxflex.signing_key"
    (tmp_path / "junk.pem").write_text("not a key")
    junk = cfg.model_copy(update={"agent_keys": {"agent-1": str(tmp_path / "junk.pem")}})
    with pytest.raises(ConfigError) as err:
        flex_client_from_config(junk, RecordingAudit(), ManualClock())
    assert err.value.key == "dsxflex.agent_keys.agent-1"


def test_meter_dsx_section(tmp_path: Path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text('[meter]\nbackend = "dsx"\n[meter.dsx]\nobject_id = "MSB-1"\nintegration = "DRGW"\n')
    cfg = load_config(p).meter
    assert cfg.dsx is not None
    meter = bms_meter_from_config(cfg.dsx, cfg.device_id, RecordingAudit(), ManualClock())
    assert meter.settings.stale_s == 110.0 and meter.device_id == cfg.device_id
    # the composition root builds it for `drgw run` (not connected)
    built = build_meter(cfg, ManualClock(), audit=RecordingAudit())
    assert type(built).__name__ == "DsxBmsMeter" and built.device_id == cfg.device_id
    for text, reason in (
        ('[meter]\nbackend = "dsx"\n', "[meter.dsx]"),
        ('[meter]\nbackend = "dsx"\n[meter.dsx]\nobject_id = "a"\ntag_path = "b"\n', "exactly one"),
        ('[meter]\nbackend = "dsx"\n[meter.dsx]\nobject_id = "a"\nstale_s = nan\n', "finite"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            load_config(p)


async def test_feed_tier_must_be_a_configured_tier(tmp_path: Path) -> None:
    """`drgw check-config` names a [[dsxflex.feeds]] tier that [gpus.tiers] lacks; a good one passes."""
    good = load_config(_flex_toml(tmp_path))
    assert await equipment_problems(good, "gw.toml") == []
    feeds = [f.model_copy(update={"tier": "gold"}) for f in good.dsxflex.feeds]
    bad = good.model_copy(update={"dsxflex": good.dsxflex.model_copy(update={"feeds": feeds})})
    problems = await equipment_problems(bad, "gw.toml")
    assert [(p.key, "not a configured tier" in p.reason) for p in problems] == [("dsxflex.feeds[0].tier", True)]
