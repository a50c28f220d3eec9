"""`drgw --help` and the parser load no heavy library: command modules import them when they run.

Checked in a fresh interpreter (this one has loaded everything already).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("asyncio", "pydantic", "sqlalchemy", "structlog", "pymodbus", "asyncua", "openleadr", "aiohttp", "nats",
         "urllib.request", "ssl")  # fmt: skip


def _loaded_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_building_the_parser_imports_no_heavy_library() -> None:
    loaded = _loaded_after("from gateway.cli import build_parser\nbuild_parser()")
    assert [m for m in HEAVY if m in loaded] == []


def test_help_of_every_command_group_still_works() -> None:
    for argv in (["--help"], ["agent", "--help"], ["audit", "verify", "--help"], ["openadr", "--help"]):
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage: drgw" in out.stdout, (argv, out.stderr)


def test_check_config_builds_the_modbus_battery_without_pymodbus() -> None:
    # The example config has a Modbus battery: its driver is built (map loaded, roles checked), and
    # pymodbus is left for the first connection or conversion.
    config = Path(__file__).resolve().parents[2] / "etc" / "gateway.example.toml"
    code = f"from gateway.cli.main import main\nassert main(['check-config', {str(config)!r}]) == 0"
    loaded = _loaded_after(code)
    assert "protocols.modbus.battery" in loaded
    assert [m for m in loaded if m.startswith("pymodbus")] == []


def test_a_battery_with_a_plain_register_map_loads_no_sunspec_definitions() -> None:
    code = (
        "from gateway.clock import SystemClock\n"
        "from gateway.config import BatteryConfig\n"
        "from protocols.modbus.build import build_battery\n"
        "from protocols.modbus.battery import ModbusBattery\n"
        "import asyncio\n"
        "async def main():\n"
        "    cfg = BatteryConfig(enabled=True, mapping='bess_generic')\n"
        "    assert type(build_battery(cfg, SystemClock())) is ModbusBattery\n"
        "asyncio.run(main())"
    )
    assert [m for m in _loaded_after(code) if m.startswith("sunspec2")] == []


async def test_verify_of_a_log_by_path_loads_neither_alembic_nor_the_config_models(tmp_path: Path) -> None:
    # An auditor's `drgw audit verify --db FILE` reads the log as it is: no schema tool, no config.
    from gateway.audit import AuditLog

    db = tmp_path / "audit.db"
    log = await AuditLog.open(str(db))
    await log.append("test.row", {"i": 1})
    await log.close()
    code = f"from gateway.cli.main import main\nassert main(['audit', 'verify', '--db', {str(db)!r}]) == 0"
    loaded = _loaded_after(code)
    assert "gateway.audit.verify" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("alembic", "pydantic")] == []


def test_an_agent_on_nvml_loads_no_config_models() -> None:
    # NVML stands in as finding no GPU (this test must not touch a real one): the agent has then
    # imported all it serves with, and says there is nothing to serve.
    code = (
        "import protocols.nvml\n"
        "protocols.nvml.NvmlFleet.open = lambda self: None\n"
        "from gateway.cli.main import main\n"
        "argv = ['agent', '--nats', 'nats://127.0.0.1:1', '--site', 's', '--hall', 'h', '--rack', 'r', '--node', 'n']\n"
        "assert main(argv) == 3\n"
    )
    loaded = _loaded_after(code)
    assert "protocols.fleet.agent" in loaded
    assert [m for m in loaded if m.split(".")[0] == "pydantic" or m.startswith("gateway.config")] == []
