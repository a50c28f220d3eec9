"""[openadr] version and [openadr.v3]: typed, validated, errors naming the key; secrets read at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from protocols.openadr3.auth import read_secret

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "gateway.example.toml"


def test_default_stays_2_0b_and_the_example_documents_3_1() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.openadr.version == "2.0b"
    assert cfg.openadr.v3.notify == "poll" and cfg.openadr.v3.base_url.startswith("https://")


def test_a_3_1_config_loads(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text('[openadr]\nversion = "3.1"\n[openadr.v3]\nbase_url = "https://vtn.example/oa3"\n'
                 'client_id = "c"\nclient_secret_file = "/etc/s"\nprograms = ["dr"]\nnotify = "mqtt"\n')  # fmt: skip
    cfg = load_config(p).openadr
    assert cfg.version == "3.1" and cfg.v3.programs == ["dr"] and cfg.v3.notify == "mqtt"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('version = "3.0"', "'2.0b' or '3.1'"),
        ('[openadr.v3]\nbase_url = "http://vtn.example"', "requires HTTPS"),
        ('[openadr.v3]\nbase_url = "ftp://vtn.example"', "is not a http:// or https:// URL"),
        ('[openadr.v3]\nclient_id = "c"', "client_id and client_secret_file go together"),
        ('[openadr.v3]\nnotify = "webhook"', "webhook_secret_file"),
        ('[openadr.v3]\nnotify = "webhook"\nwebhook_secret_file = "/s"', "webhook_cert and webhook_key"),
        ('[openadr.v3]\nnotify = "carrier-pigeon"', "'webhook', 'mqtt' or 'poll'"),
        ("[openadr.v3]\nresource_names = []", "at least 1"),
        ("[openadr.v3]\nbogus = 1", "unknown key"),
    ],
)
def test_bad_3_1_keys_are_named(tmp_path: Path, text: str, reason: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[openadr]\n" + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.key.startswith("openadr")
    assert reason in info.value.reason


def test_secret_files(tmp_path: Path) -> None:
    good = tmp_path / "s"
    good.write_text("  s3cret  \nignored\n")
    assert read_secret(str(good), "openadr.v3.client_secret_file") == "s3cret"
    empty = tmp_path / "e"
    empty.write_text("\n")
    for path, why in ((str(tmp_path / "missing"), "cannot read"), (str(empty), "empty")):
        with pytest.raises(ConfigError, match=why) as info:
            read_secret(path, "openadr.v3.client_secret_file")
        assert info.value.key == "openadr.v3.client_secret_file"
