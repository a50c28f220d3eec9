"""OPC UA equipment: node maps, a secured client and meter, and a simulator server."""

from protocols.opcua.certs import CertFiles, make_certificate
from protocols.opcua.client import OpcuaClient, OpcuaMeter, OpcuaSecurity, Reading
from protocols.opcua.nodemap import Node, NodeMap, load_node_map, node_map_names, parse_node_map
from protocols.opcua.simulator import OpcuaSimServer

__all__ = [
    "CertFiles",
    "Node",
    "NodeMap",
    "OpcuaClient",
    "OpcuaMeter",
    "OpcuaSecurity",
    "OpcuaSimServer",
    "Reading",
    "load_node_map",
    "make_certificate",
    "node_map_names",
    "parse_node_map",
]
