"""The parallel chain walk's processes import only what the walk needs: each one is spawned afresh."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_walk_module_loads_no_database_toolkit() -> None:
    probe = "import json, sys\nimport gateway.audit.verify_ranges\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in ("sqlalchemy", "alembic", "aiosqlite", "asyncpg", "pydantic", "structlog") if m in loaded] == []
