"""The live console's style and script, inlined into the page (no fetch: the appliance may be offline).

They live beside this module as ``static/console.css`` and ``static/console.js``.

The script listens to ``/console/stream`` (Server-Sent Events): ``points`` adds chart points (the
ring buffer's, oldest first), ``status`` swaps in the server-rendered sections. It draws the chart
into the inline SVG and marks ``<body data-chart=N>`` with the points drawn and ``data-updates``
with the status messages taken, so a browser test can wait for them. The opt-out dialog posts to
``/events/{id}/opt-out`` with the operator's token (kept in the tab's sessionStorage only) and
writes the answer into ``<body data-optout>``.
"""

import functools
from importlib import resources


@functools.cache
def asset(name: str) -> str:
    """Return one of the console's static files (``console.css``, ``console.js``) as text."""
    return resources.files("protocols.mgmt").joinpath("static", name).read_text(encoding="utf-8")
