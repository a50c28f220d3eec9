"""OpenADR 3.1: the gateway's VEN over REST, webhooks and MQTT, and a simulated VTN for the tests."""

from protocols.openadr3.convert import OPEN_ENDED_S, EventRefused, to_demand_event
from protocols.openadr3.schema import SPEC_VERSION, SchemaRejected
from protocols.openadr3.ven import Ven3
from protocols.openadr3.vtn_sim import SimVtn3

__all__ = ["OPEN_ENDED_S", "SPEC_VERSION", "EventRefused", "SchemaRejected", "SimVtn3", "Ven3", "to_demand_event"]
