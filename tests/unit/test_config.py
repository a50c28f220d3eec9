"""Config: one TOML file, validated; a bad file names the file, key and reason, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "gateway.example.toml"


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.openadr.simple_levels["2"] == 0.20
    assert [g.count for g in cfg.gpus.groups] == [8, 4, 4]


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[control]\ntick_s = -1\n", "control.tick_s", "greater than 0"),
        ("[battery]\nport = 70000\n", "battery.port", "less than or equal to 65535"),
        ("[openadr]\nopt_policy = 'sometimes'\n", "openadr.opt_policy", "'feasible', 'always' or 'never'"),
        ("[gpus]\nbackend = 'sim'\nbogus = 1\n", "gpus.bogus", "unknown key"),
        ("[[gpus.groups]]\ncount = 2\ntier = 'flex9'\n", "gpus", "flex9"),
        ('[openadr.simple_levels]\n"4" = 0.5\n', "openadr.simple_levels", "level '4'"),
        ("[control\ntick_s = 1\n", "(syntax)", ""),
        ("[meter]\nmin_w = 10.0\nmax_w = 5.0\n", "meter", "min_w 10.0 must be below max_w 5.0"),
        ("[meter]\nmax_w = inf\n", "meter.max_w", "finite"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == str(p)
    assert info.value.key == key
    assert reason in info.value.reason


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nsoc_floor_pct = 150\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "limits.soc_floor_pct" in err and "100" in err


def test_bad_config_through_the_installed_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[battery]\nunit = 'one'\n")
    drgw = Path(sys.executable).parent / "drgw"
    proc = subprocess.run([str(drgw), "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "battery.unit" in proc.stderr and str(bad) in proc.stderr
    assert proc.stderr.count("\n") == 1  # one clear message, no traceback
