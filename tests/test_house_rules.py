"""The rules of the house, checked on the source tree (no import of the code under test).

- No Python file over 500 lines; today's offenders are listed with their size and may only shrink.
- ``gateway/`` imports no protocol library (only ``protocols/`` talks to the wire).
- A protocol package does not import another (shared pieces live in ``gateway/`` or ``mappings/``).
- Collaborators are not probed with ``getattr``/``hasattr``: today's uses are counted per file and may
  only go down (the lazy re-exports of package ``__init__`` modules, which read a module, do not count).

When a file leaves an allow-list below (split, or its probing removed), take it off the list: the
test says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("gateway", "protocols", "drgw_tools", "mappings", "migrations", "tests")
MAX_LINES = 500

# Files allowed over MAX_LINES, with their line count: each may only shrink. None is left (config.py,
# audit/log.py and the OpenADR fuzz were split by role); none may join.
LONG_FILES: dict[str, int] = {}

# Third-party libraries that speak a wire protocol or parse its payloads: only protocols/ imports them.
PROTOCOL_LIBRARIES = {
    "aiohttp",
    "aiomqtt",
    "asyncua",
    "joserfc",
    "jsonschema",
    "lxml",
    "nats",
    "openleadr",
    "paho",
    "pymodbus",
    "pynvml",
    "signxml",
    "sunspec2",
    "xmltodict",
}

# getattr/hasattr calls per file today (probing a collaborator, an argparse namespace or a config
# model): the count may only go down.
PROBES = {
    "drgw_tools/bench/dispatch.py": 2,
    "gateway/accounting.py": 1,
    "gateway/audit/chain.py": 2,
    "gateway/audit/measurements.py": 1,
    "gateway/audit/records.py": 1,
    "gateway/cli/audit.py": 7,
    "gateway/cli/audit_queries.py": 2,
    "gateway/cli/openadr.py": 2,
    "gateway/config/devices.py": 1,
    "gateway/config/dsx.py": 1,
    "gateway/config/openadr.py": 1,
    "gateway/fdbudget.py": 1,
    "gateway/logs.py": 1,
    "gateway/preflight.py": 1,
    "gateway/shadow.py": 1,
    "gateway/status.py": 1,
    "protocols/dsx/build.py": 1,
    "protocols/modbus/bms_server.py": 1,
    "protocols/modbus/simulator.py": 1,
    "protocols/modbus/transport.py": 1,
    "protocols/modbus/ups.py": 1,
    "protocols/nvml/backend.py": 3,
    "protocols/nvml/smoke.py": 3,
    "protocols/opcua/client.py": 2,
    "protocols/opcua/simulator.py": 1,
    "protocols/openadr/client.py": 2,
    "protocols/openadr/reports.py": 1,
    "protocols/openadr3/events.py": 4,
    "protocols/openadr3/vtn_sim.py": 1,
}


def _files(*tops: str) -> list[Path]:
    """Return every Python file under the given top-level folders, sorted."""
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def _rel(path: Path) -> str:
    """Return a path relative to the repository root, with forward slashes."""
    return path.relative_to(ROOT).as_posix()


def _imports(path: Path) -> list[str]:
    """Return every module a file imports (at the top or inside a function), absolute names only."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _probes(path: Path) -> int:
    """Return how many getattr/hasattr calls a file makes, not counting reads of an imported module."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("getattr", "hasattr") or not node.args:
            continue
        target = node.args[0]
        reads_module = (
            isinstance(target, ast.Call)
            and isinstance(target.func, ast.Attribute)
            and target.func.attr == "import_module"
        )
        count += not reads_module
    return count


def test_no_file_over_500_lines_and_the_long_ones_only_shrink() -> None:
    """Every file is at most 500 lines, but those listed in LONG_FILES, which may not grow."""
    problems = []
    for path in _files(*CODE):
        rel, lines = _rel(path), len(path.read_text(encoding="utf-8").splitlines())
        allowed = LONG_FILES.get(rel, MAX_LINES)
        if lines > allowed:
            problems.append(f"{rel}: {lines} lines (at most {allowed}): split it by role")
        elif rel in LONG_FILES and lines <= MAX_LINES:
            problems.append(f"{rel}: {lines} lines now; take it off LONG_FILES")
    for rel in LONG_FILES:
        if not (ROOT / rel).exists():
            problems.append(f"{rel}: gone; take it off LONG_FILES")
    assert not problems, "\n".join(problems)


def test_gateway_imports_no_protocol_library() -> None:
    """Only protocols/ imports the libraries that speak to equipment, the utility and the fleet."""
    found = [
        f"{_rel(path)} imports {name}"
        for path in _files("gateway")
        for name in _imports(path)
        if name.split(".")[0] in PROTOCOL_LIBRARIES
    ]
    assert not found, "\n".join(found)


def test_mappings_hold_data_not_code() -> None:
    """mappings/ holds YAML equipment maps and its package marker (a docstring), nothing else."""
    found = [p.name for p in (ROOT / "mappings").iterdir() if p.suffix not in (".yaml", "") and p.name != "__init__.py"]
    marker = ast.parse((ROOT / "mappings" / "__init__.py").read_text()).body
    assert not found, f"mappings/ holds code or other files: {found}"
    assert len(marker) == 1 and isinstance(marker[0], ast.Expr), "mappings/__init__.py holds more than its docstring"


def test_protocol_packages_do_not_import_each_other() -> None:
    """A protocol package imports gateway/, mappings/ and itself, never another protocol package."""
    found = []
    for path in _files("protocols"):
        parts = path.relative_to(ROOT / "protocols").parts
        if len(parts) < 2:
            continue  # protocols/__init__.py
        own = parts[0]
        for name in _imports(path):
            bits = name.split(".")
            if bits[0] == "protocols" and len(bits) > 1 and bits[1] != own:
                found.append(f"{_rel(path)} imports {name}")
    assert not found, "\n".join(found)


def test_getattr_probing_only_goes_down() -> None:
    """No new getattr/hasattr on collaborators: declare what you rely on in an interface instead."""
    problems = []
    for path in _files("gateway", "protocols", "drgw_tools", "mappings"):
        rel, n = _rel(path), _probes(path)
        allowed = PROBES.get(rel, 0)
        if n > allowed:
            problems.append(f"{rel}: {n} getattr/hasattr calls (at most {allowed})")
        elif n < allowed:
            problems.append(f"{rel}: {n} getattr/hasattr calls now; lower PROBES to {n}")
    assert not problems, "\n".join(problems)


def test_the_runtime_packages_do_not_import_the_tools() -> None:
    """Benchmarks and private brokers (drgw_tools) stay out of gateway/ and protocols/, but for the CLI's
    `drgw bench` commands and `drgw demo --site dsx` (its own broker), which import them when run."""
    found = [
        f"{_rel(path)} imports {name}"
        for path in _files("gateway", "protocols")
        for name in _imports(path)
        if name.split(".")[0] == "drgw_tools" and _rel(path) not in ("gateway/cli/bench.py", "gateway/cli/site.py")
    ]
    assert not found, "\n".join(found)
