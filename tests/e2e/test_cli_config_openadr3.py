"""`drgw check-config` and `drgw run` check the OpenADR 3.1 section before anything starts.

With ``[openadr] version = "3.1"`` the files the 3.1 VEN reads at start are read as it reads them:
the client secret and the webhook HMAC key (readable and not empty), the webhook server's
certificate and key, and the VEN's TLS context for an https VTN. One line per problem, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from tests.e2e.test_cli_config import _config, _toml, _write
from tests.gwproc import free_port


def _v3(t: Path, **keys: Any) -> dict[str, dict[str, Any]]:
    """Return the [openadr] and [openadr.v3] sections of a 3.1 site (nothing listens on its VTN port)."""
    v3 = {"base_url": f"http://127.0.0.1:{free_port()}/openadr3/3.1.0", "allow_insecure": True,
          "client_id": "ven", "client_secret_file": _write(t, "client.secret", "s3cret\n"), **keys}  # fmt: skip
    return {"openadr": {"version": "3.1"}, "openadr.v3": v3}


CASES: dict[str, tuple[Any, str, str]] = {
    "client secret file empty": (
        lambda t: _v3(t, client_secret_file=_write(t, "empty.secret", "\n")),
        "openadr.v3.client_secret_file",
        "is empty",
    ),
    "client secret file missing": (
        lambda t: _v3(t, client_secret_file=str(t / "none.secret")),
        "openadr.v3.client_secret_file",
        "cannot read",
    ),
    "webhook key file empty": (
        lambda t: _v3(t, notify="webhook", webhook_secret_file=_write(t, "hook.secret", "")),
        "openadr.v3.webhook_secret_file",
        "is empty",
    ),
    "webhook certificate not a certificate": (
        lambda t: _v3(
            t,
            notify="webhook",
            webhook_secret_file=_write(t, "hook.secret", "k\n"),
            webhook_cert=_write(t, "hook.pem", "not PEM\n"),
            webhook_key=_write(t, "hook.key", "no\n"),
        ),
        "openadr.v3.webhook_cert",
        "cannot load",
    ),  # fmt: skip
    "VTN's CA file not a certificate": (
        lambda t: {
            **_v3(t, base_url="https://127.0.0.1:1/openadr3/3.1.0"),
            "openadr": {"version": "3.1", "ca_file": _write(t, "ca.pem", "not PEM\n")},
        },
        "openadr.ca_file",
        "TLS context",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", CASES)
def test_check_config_and_run_refuse_a_bad_31_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    case, key, reason = CASES[name]
    cfg = _write(tmp_path, "gw.toml", _toml(_config(tmp_path, case(tmp_path))))
    assert main(["check-config", cfg]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("config error: ") for line in lines), lines
    assert [line for line in lines if key in line and reason in line], lines
    assert len(lines) == len(set(lines)) == 1, lines  # one problem, said once
    assert main(["run", "--config", cfg]) == 2
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error: ")]
    assert refused == lines  # run refuses the same, before anything starts
    assert not (tmp_path / "audit.db").exists()


def test_a_good_31_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = _v3(tmp_path, notify="webhook", webhook_secret_file=_write(tmp_path, "hook.secret", "k\n"))
    cfg = _write(tmp_path, "gw.toml", _toml(_config(tmp_path, extra)))
    capsys.readouterr()
    assert main(["check-config", cfg]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"{cfg}: OK\n"
