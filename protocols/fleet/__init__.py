"""GPUs on other hosts: node agents and the gateway's NatsFleet over NATS (a private nats-server for
tests and the bench is ``drgw_tools.servers.nats``)."""

from protocols.fleet.agent import NodeAgent
from protocols.fleet.client import LeaseLapse, NatsFleet
from protocols.fleet.labels import GpuLabels

__all__ = ["GpuLabels", "LeaseLapse", "NatsFleet", "NodeAgent"]
