"""The parallel chain walk's processes import only what the walk needs: each one is spawned afresh."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("sqlalchemy", "alembic", "aiosqlite", "asyncpg", "pydantic", "structlog")


@pytest.mark.parametrize("module", ["gateway.audit.verify_ranges", "gateway.audit.verify_pg_ranges"])
def test_the_walk_modules_load_no_database_toolkit(module: str) -> None:
    probe = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in HEAVY if m in loaded] == []  # a PostgreSQL helper imports asyncpg when it starts
