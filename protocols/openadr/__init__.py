"""OpenADR 2.0b: the gateway's VEN, the wire-to-domain conversion and a simulated utility VTN."""

from protocols.openadr.convert import OPEN_ENDED_S, InvalidEvent, SignalNotSupported, to_demand_event
from protocols.openadr.reports import DEVICE_USAGE_ID, HISTORY_ID, STATUS_ID, USAGE_ID
from protocols.openadr.ven import StateStore, Ven
from protocols.openadr.vtn import SimVtn
from protocols.openadr.xmlguard import MAX_XML_BYTES, XmlRejected, check_xml

__all__ = [
    "DEVICE_USAGE_ID",
    "HISTORY_ID",
    "MAX_XML_BYTES",
    "OPEN_ENDED_S",
    "STATUS_ID",
    "USAGE_ID",
    "InvalidEvent",
    "SignalNotSupported",
    "SimVtn",
    "StateStore",
    "Ven",
    "XmlRejected",
    "check_xml",
    "to_demand_event",
]
