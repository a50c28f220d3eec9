"""``drgw run``: start the site from its config, run until SIGINT/SIGTERM, then release everything."""

from __future__ import annotations

import asyncio
import signal

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.logs import get_logger


async def run_gateway(cfg: GatewayConfig, source: str = "<config>") -> list[ConfigError]:
    """Run the gateway from config until SIGINT/SIGTERM; return the config problems that stopped it starting."""
    from gateway.audit import AuditLog
    from gateway.clock import SystemClock
    from gateway.compose import Site, build_site
    from gateway.fdbudget import ExhaustionLog, fit_caps, raise_soft_limit
    from gateway.heap import settle_heap
    from gateway.preflight import startup_problems
    from gateway.threads import share_the_lock

    problems = await startup_problems(cfg, source)  # what check-config refuses, before anything starts
    if problems:
        return problems
    share_the_lock()  # worker threads (the audit writer's) get the interpreter lock without waiting 5 ms
    log = get_logger("gateway.run")
    ExhaustionLog().install(asyncio.get_running_loop())  # running out of descriptors: one line, not a flood
    cfg = fit_caps(cfg, raise_soft_limit())  # listeners' caps leave descriptors for devices and the VTN
    clock = SystemClock()
    if cfg.standby.enabled:  # one of a pair on one PostgreSQL database: active or standby by lease
        from gateway.standby.role import run_standby

        await run_standby(cfg, clock, source)
        return []
    audit = await AuditLog.open_config(cfg.audit, clock, journal=True)
    site: Site | None = None
    reason = "startup failed"
    try:
        site = await build_site(cfg, clock, audit, source)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await site.start()
        heap = settle_heap()  # what start-up built stays: no collection walks it again; rarer young passes
        o = cfg.openadr
        log.info(
            "gateway running",
            site=cfg.site.name,
            openadr=o.version,
            vtn=o.v3.base_url if o.version == "3.1" else o.vtn_url,
            frozen_objects=heap,
        )
        await stop.wait()
        reason = "signal"
    except Exception as err:
        reason = f"startup failed: {err}"
        raise
    finally:
        # Whatever was started is stopped, and every actuation released, even after a failed start.
        if site is not None:
            await site.stop(reason)
        await audit.close()  # seals buffered measurements and signs a last checkpoint when a key is set
    return []
