"""GPUs on other hosts: node agents and the gateway's NatsFleet over NATS, plus a private nats-server."""

from protocols.fleet.agent import NodeAgent
from protocols.fleet.client import LeaseLapse, NatsFleet
from protocols.fleet.labels import GpuLabels
from protocols.fleet.server import NatsServer, find_binary

__all__ = ["GpuLabels", "LeaseLapse", "NatsFleet", "NatsServer", "NodeAgent", "find_binary"]
