"""Connecting to NATS: a bounded first attempt, then reconnection without limit.

nats-py uses one ``max_reconnect_attempts`` for the first connection and for reconnects, and with
-1 ("reconnect forever") its first ``connect`` never returns while the server is unreachable: no
error, no way for the caller to retry with backoff, report the link down, or stop on SIGTERM. So
the first connection is made with one retry (an error if both fail), and once it is up the client
is switched to unlimited reconnects (``Client.options`` is read again at every reconnect).
"""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from gateway.errors import DeviceUnavailable

FIRST_ATTEMPTS_RETRIES = 1  # one retry, reconnect_time_wait apart, before the first connect fails


async def connect_nats(url: str, *, connect_timeout: float = 2.0, **options: Any) -> NatsClient:
    """Connect to ``url``; raise DeviceUnavailable when it cannot be reached now; reconnect forever after."""
    user_error_cb = options.pop("error_cb", None)
    last: list[Exception] = []

    async def error_cb(err: Exception) -> None:
        last[:] = [err]  # nats-py ends a failed first connect with NoServersError: keep the real cause
        if user_error_cb is not None:
            await user_error_cb(err)

    try:
        nc = await nats.connect(
            url,
            max_reconnect_attempts=FIRST_ATTEMPTS_RETRIES,
            connect_timeout=connect_timeout,
            error_cb=error_cb,
            **options,
        )
    except (TimeoutError, nats.errors.Error, OSError) as err:
        cause = last[0] if last and isinstance(err, nats.errors.NoServersError) else err
        raise DeviceUnavailable(f"nats {url}", f"cannot connect: {cause!r}") from err
    nc.options["max_reconnect_attempts"] = -1
    return nc
