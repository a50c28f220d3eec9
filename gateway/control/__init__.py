"""The control loop (``loop``), its pure regulator (``regulator``), reading the site (``site``), the ``ledger``."""

from gateway.control.loop import BASELINE_HOLD_S, STEP_WAKE_S, ControlLoop
from gateway.control.regulator import Regulation, Tuning
from gateway.control.site import SiteReader
from gateway.status import TickRecord

__all__ = ["BASELINE_HOLD_S", "STEP_WAKE_S", "ControlLoop", "Regulation", "SiteReader", "TickRecord", "Tuning"]
