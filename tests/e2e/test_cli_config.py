"""`drgw check-config` (the unit's ExecStartPre) refuses what `drgw run` would refuse, in the same lines.

Both commands run as processes on each bad config: exit 2, one `config error: FILE: KEY: REASON` line per
problem, no traceback, and the same lines from both. A good config passes check-config and starts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from protocols.opcua import make_certificate
from tests.gwproc import DRGW, free_port

Case = Callable[[Path], tuple[dict[str, dict[str, Any]], str]]  # (sections, key the refusal names)


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)  # repr(float('inf')) is TOML's inf

    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items()) for name, body in sections.items()
    )


def _config(tmp_path: Path, extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return a config that would start on loopback (nothing listens on its VTN or battery port), plus ``extra``."""
    base: dict[str, dict[str, Any]] = {
        "audit": {"db_url": str(tmp_path / "audit.db")},
        "openadr": {"vtn_url": f"http://127.0.0.1:{free_port()}/OpenADR2/Simple/2.0b"},
        "battery": {"port": free_port(), "timeout_s": 0.2},
        "logging": {"format": "json"},
        "management": {"enabled": False},
    }
    for name, body in extra.items():
        base[name] = {**base.get(name, {}), **body}
    return base


def _write(tmp_path: Path, name: str, text: str, mode: int | None = None) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    if mode is not None:
        p.chmod(mode)
    return str(p)


OVERLAP = (
    "model: x\nvendor: y\nkind: battery\npoints:\n  a: {table: holding, address: 0, type: uint32}\n"
    "  b: {table: holding, address: 1, type: uint16}\n"
)

CASES: dict[str, Case] = {
    "inf timeout": lambda t: ({"battery": {"timeout_s": float("inf")}}, "battery.timeout_s"),
    "nan clock skew": lambda t: ({"openadr": {"max_clock_skew_s": float("nan")}}, "openadr.max_clock_skew_s"),
    "overlapping map": lambda t: ({"battery": {"mapping": _write(t, "o.yaml", OVERLAP)}}, "points.b.address"),
    "missing signing key": lambda t: ({"audit": {"signing_key": str(t / "none.key")}}, "audit.signing_key"),
    # A documentation address (RFC 5737), so that even a gateway that took it would bind nothing real.
    "management off loopback": lambda t: (
        {"management": {"enabled": True, "host": "192.0.2.1", "port": 0}},
        "management.host",
    ),
    "vtn_url not a URL": lambda t: ({"openadr": {"vtn_url": "not a url"}}, "openadr.vtn_url"),
    "OPC UA certificate missing": lambda t: (
        {
            "meter": {"backend": "opcua"},
            "meter.opcua": {
                "certificate": str(t / "c.der"),
                "private_key": str(t / "k.pem"),
                "server_certificate": str(t / "s.der"),
            },
        },
        "meter.opcua.certificate",
    ),
}


async def _drgw(*args: str) -> tuple[int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        DRGW, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"drgw {args[0]} did not refuse the config within 60 s (it started?)") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode().splitlines()


def _refusals(lines: list[str]) -> list[str]:
    """Return the config error lines; every other line must be a JSON log line (no traceback)."""
    out = []
    for line in lines:
        if line.startswith("config error: "):
            out.append(line)
        else:
            json.loads(line)  # anything else is the JSON log, or the test fails here
    return out


async def test_check_config_and_run_refuse_the_same_bad_configs(tmp_path: Path) -> None:
    """Run both commands on every case at once; each exits 2 with the same one-line refusals."""
    jobs = []
    for i, (name, case) in enumerate(CASES.items()):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        extra, key = case(folder)
        cfg = _write(folder, "gw.toml", _toml(_config(folder, extra)))
        jobs.append((name, cfg, key, _drgw("check-config", cfg), _drgw("run", "--config", cfg)))
    results = await asyncio.gather(*(asyncio.gather(check, run) for *_, check, run in jobs))
    for (name, cfg, key, *_), ((check_rc, check_err), (run_rc, run_err)) in zip(jobs, results, strict=True):
        assert check_rc == 2, (name, check_err)
        assert run_rc == 2, (name, run_err)
        refused = _refusals(check_err)
        assert refused == _refusals(run_err), name
        assert any(key in line for line in refused), (name, refused)
        assert all(line.count(": ") >= 3 for line in refused), refused  # config error: FILE: KEY: REASON
        assert not Path(cfg).with_name("audit.db").exists(), f"{name}: run opened its database before refusing"


def test_deep_nesting_is_one_line_from_both_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, "gw.toml", "a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n")
    assert main(["check-config", cfg]) == 2
    assert main(["run", "--config", cfg]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"config error: {cfg}: (syntax): tables or arrays nested too deeply"] * 2


def _key_files(t: Path) -> dict[str, str]:
    good = make_certificate(t, "client", "urn:drgw:test", server=False)
    other = make_certificate(t, "other", "urn:drgw:other", server=True)
    return {
        "certificate": str(good.certificate),
        "private_key": str(other.private_key),
        "server_certificate": str(other.certificate),
    }


MORE_CASES: dict[str, tuple[Case, str]] = {
    "history past a date": (lambda t: ({"openadr": {"history_s": 1e12}}, "openadr.history_s"), ""),
    "schema-invalid map": (
        lambda t: (
            {"battery": {"mapping": _write(t, "m.yaml", OVERLAP.replace("kind:", "colour: red\nkind:"))}},
            "colour",
        ),
        "unknown key",
    ),
    "a meter's map for the battery": (lambda t: ({"battery": {"mapping": "meter_facility"}}, "dispatchable"), ""),
    "map nested too deeply": (
        lambda t: ({"battery": {"mapping": _write(t, "d.yaml", "a: " + "[" * 5000 + "]" * 5000)}}, "(syntax)"),
        "nested too deeply",
    ),
    "signing key is not a key": (
        lambda t: ({"audit": {"signing_key": _write(t, "k.pem", "not a key\n")}}, "audit.signing_key"),
        "not an unencrypted PEM private key",
    ),
    "VEN certificate missing": (
        lambda t: (
            {"openadr": {"client_cert": str(t / "ven.pem"), "client_key": str(t / "ven.key")}},
            "openadr.client_cert",
        ),
        "cannot load",
    ),
    "OPC UA password file missing": (
        lambda t: (
            {
                "meter": {"backend": "opcua"},
                "meter.opcua": {"security": "none", "username": "u", "password_file": str(t / "pw")},
            },
            "meter.opcua.password_file",
        ),
        "cannot read",
    ),
    "OPC UA key of another certificate": (
        lambda t: ({"meter": {"backend": "opcua"}, "meter.opcua": _key_files(t)}, "meter.opcua.private_key"),
        "is not the key of certificate",
    ),
    "a battery's map for the meter": (
        lambda t: ({"meter": {"backend": "modbus", "mapping": "bess_generic", "port": free_port()}}, "kind"),
        "not a meter",
    ),
    "journal in a missing folder": (
        lambda t: ({"audit": {"measurement_journal": str(t / "no" / "j")}}, "audit.measurement_journal"),
        "no folder",
    ),
    "operator token file holding no token": (
        lambda t: (
            {"management": {"enabled": True, "token_file": _write(t, "tokens", "# nobody yet\n", 0o600)}},
            "management.token_file",
        ),
        "holds no token",
    ),
    "operator token file readable by anyone": (
        lambda t: (
            {
                "management": {
                    "enabled": True,
                    "token_file": _write(t, "tokens", "alice s3cret-token-1234567890\n", 0o644),
                }
            },
            "management.token_file",
        ),
        "chmod 600",
    ),
    "management TLS certificate missing": (
        lambda t: (
            {"management": {"enabled": True, "tls_cert": str(t / "mgmt.pem"), "tls_key": str(t / "mgmt.key")}},
            "management.tls_cert",
        ),
        "cannot load certificate",
    ),
    "a password file that is a folder": (
        lambda t: (
            {
                "meter": {"backend": "opcua"},
                "meter.opcua": {"security": "none", "username": "u", "password_file": str(t)},
            },
            "meter.opcua.password_file",
        ),
        "",
    ),
}


@pytest.mark.parametrize("name", MORE_CASES)
def test_check_config_refuses_what_run_would_load_and_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """In-process, for the other files `run` loads: one line naming the file, the key and the reason."""
    case, reason = MORE_CASES[name]
    extra, key = case(tmp_path)
    cfg = _write(tmp_path, "gw.toml", _toml(_config(tmp_path, extra)))
    assert main(["check-config", cfg]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("config error: ") for line in lines), lines
    assert any(key in line and reason in line for line in lines), lines


def test_a_good_config_with_its_files_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "keygen", "--out", str(tmp_path / "sign.key")]) == 0
    files = make_certificate(tmp_path, "client", "urn:drgw:test", server=False)
    server = make_certificate(tmp_path, "server", "urn:drgw:server", server=True)
    extra = {
        "audit": {"signing_key": str(tmp_path / "sign.key"), "checkpoint_dir": str(tmp_path / "cp")},
        "meter": {"backend": "opcua"},
        "meter.opcua": {
            "certificate": str(files.certificate),
            "private_key": str(files.private_key),
            "server_certificate": str(server.certificate),
            "username": "gw",
            "password_file": _write(tmp_path, "pw", "secret\n"),
        },
        "management": {"enabled": True, "host": "0.0.0.0", "allow_non_loopback": True},
    }
    cfg = _write(tmp_path, "gw.toml", _toml(_config(tmp_path, extra)))
    capsys.readouterr()
    assert main(["check-config", cfg]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"{cfg}: OK\n"
    assert not (tmp_path / "audit.db").exists()  # checking opens no database
