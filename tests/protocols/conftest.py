"""Fixtures shared by the protocol tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pgdb import fresh_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Yield the URL of an empty database of each backend (the SQLite file in a folder not made yet)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/sub/audit.db"
        return
    async with fresh_pg_database() as url:
        yield url
