"""OPC UA node maps: validation errors name the file, the node and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.errors import ConfigError
from protocols.opcua.nodemap import load_node_map, parse_node_map

GOOD = {"namespace": "site", "path": ["A", "B"], "type": "Double"}


@pytest.mark.parametrize(
    ("nodes", "key", "reason"),
    [
        ({"p": {**GOOD, "namespace": "nope"}}, "nodes.p.namespace", "no namespace alias"),
        ({"p": {**GOOD, "node_id": "s=X"}}, "nodes.p", "exactly one"),
        ({"p": {"namespace": "site", "type": "Double"}}, "nodes.p", "exactly one"),
        ({"p": {**GOOD, "path": None, "node_id": "ns=2;s=X"}}, "nodes.p.node_id", "s=<string id>"),
        ({"p": {**GOOD, "path": ["other:B"]}}, "nodes.p.path", "alias"),
        ({"p": {**GOOD, "type": "Boolean", "scale": 10}}, "nodes.p.scale", "numbers only"),
        ({"p": {**GOOD, "bounds": {"min": 5, "max": 1}}}, "nodes.p.bounds", "min <= max"),
        ({"p": {**GOOD, "type": "String", "bounds": {"min": 0, "max": 1}}}, "nodes.p.bounds", "numbers only"),
        ({"p": {**GOOD, "type": "Decimal"}}, "nodes.p.type", "Boolean"),
        ({"p": {**GOOD, "role": "x"}, "q": {**GOOD, "role": "x"}}, "nodes.q.role", "already"),
        ({"p": {**GOOD, "colour": 1}}, "nodes.p.colour", "unknown key"),
    ],
)
def test_bad_node_maps_name_file_node_and_reason(tmp_path: Path, nodes: dict, key: str, reason: str) -> None:
    """Raise ConfigError naming the file, the node and the reason."""
    doc = {"protocol": "opcua", "model": "m", "vendor": "v", "namespaces": {"site": "urn:x"}, "nodes": nodes}
    f = tmp_path / "map.yaml"
    f.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_node_map(f)
    assert (info.value.path, info.value.key) == (str(f), key)
    assert reason in info.value.reason


def test_a_register_map_is_not_a_node_map() -> None:
    """Refuse a Modbus map where a node map is expected."""
    with pytest.raises(ConfigError, match="protocol"):
        parse_node_map({"model": "m", "vendor": "v", "namespaces": {"a": "urn:a"}, "nodes": {"p": GOOD}})
