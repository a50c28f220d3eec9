"""Services the simulated VTN adds to openleadr's server: EiOpt (oadrCreateOpt, oadrCancelOpt, which
openleadr's server leaves as stubs) and both sides of a registration cancellation (the VEN's
oadrCancelPartyRegistration, and the VEN's oadrCanceledPartyRegistration answering the VTN's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from openleadr.service import VTNService, handler, service

Record = Callable[[dict[str, Any]], Awaitable[Any]]


@service("EiOpt")
class OptService(VTNService):
    """The EiOpt service: records oadrCreateOpt and oadrCancelOpt and acknowledges them."""

    def __init__(self, vtn_id: str, on_create: Record, on_cancel: Record) -> None:
        super().__init__(vtn_id)
        self._on_create = on_create
        self._on_cancel = on_cancel

    @handler("oadrCreateOpt")
    async def create_opt(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record the opt and acknowledge it with oadrCreatedOpt."""
        await self._on_create(payload)
        return "oadrCreatedOpt", {"opt_id": payload.get("opt_id")}

    @handler("oadrCancelOpt")
    async def cancel_opt(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record the cancellation and acknowledge it with oadrCanceledOpt."""
        await self._on_cancel(payload)
        return "oadrCanceledOpt", {"opt_id": payload.get("opt_id")}


def add_cancellation_handlers(registration_service: Any, on_cancel: Record, on_canceled: Record) -> None:
    """Let a VEN cancel its registration, and record its answers to the VTN's cancellations."""

    async def cancel(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        await on_cancel(payload)
        return "oadrCanceledPartyRegistration", {"registration_id": payload.get("registration_id"),
                                                 "ven_id": payload.get("ven_id")}  # fmt: skip

    async def canceled(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        await on_canceled(payload)
        return "oadrResponse", {}

    registration_service.handlers["oadrCancelPartyRegistration"] = cancel
    registration_service.handlers["oadrCanceledPartyRegistration"] = canceled


__all__ = ["OptService", "add_cancellation_handlers"]
