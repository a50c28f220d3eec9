"""Fixtures of the fault tests: a site (gateway process, VTN, battery, proxies) torn down after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import Knobs, Site


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Site]]]:
    """Return a factory: ``await make_site(**knobs)`` starts the peers and writes the config."""
    sites: list[Site] = []

    async def make(**knobs: Any) -> Site:
        site = Site(tmp_path, Knobs(**knobs))
        sites.append(site)
        await site.start()
        return site

    try:
        yield make
    finally:
        for site in sites:
            await site.close()
