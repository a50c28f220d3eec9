"""OpenADR 2.0b: the gateway's VEN, the wire-to-domain conversion and a simulated utility VTN."""

from protocols.openadr.convert import OPEN_ENDED_S, to_demand_event
from protocols.openadr.ven import Ven
from protocols.openadr.vtn import SimVtn
from protocols.openadr.xmlguard import MAX_XML_BYTES, XmlRejected, check_xml

__all__ = ["MAX_XML_BYTES", "OPEN_ENDED_S", "SimVtn", "Ven", "XmlRejected", "check_xml", "to_demand_event"]
