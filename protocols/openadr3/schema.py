"""The OpenADR 3.1.0 OpenAPI definition as JSON Schema: validate objects, requests and responses.

The vendored definition (``spec/openadr3-3.1.0.yaml``, see ``spec/README.md``) is OpenAPI 3.0; its
``components/schemas`` become one JSON Schema 2020-12 document: ``nullable`` becomes a ``null``
type, ``exclusiveMaximum: true`` a number, the ``objectType`` discriminator of
``notification.object`` an if/then per object type, and ``$ref`` points into ``$defs``.
``date-time`` is checked by ``timing.is_datetime`` (RFC 3339, or the "now" sentinel day the
definition itself describes).

Two contradictions of the definition are corrected, nothing else: the ``ven`` and ``resource``
responses compose ``objectMetadata`` (``objectType`` ``VEN``/``RESOURCE``) with
``BlVenRequest``/``BlResourceRequest`` (``objectType`` ``BL_VEN_REQUEST``/``BL_RESOURCE_REQUEST``),
which no object can satisfy; here the responses take ``objectMetadata``'s.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import best_match

from gateway.errors import InputRejected
from protocols.openadr3.timing import is_datetime

SPEC_VERSION = "3.1.0"
_SPEC_FILE = "openadr3-3.1.0.yaml"
_DROP = frozenset({"discriminator", "example", "nullable"})
_METHODS = ("get", "post", "put", "delete")


class SchemaRejected(InputRejected):
    """A body, parameter or object that does not conform to the OpenADR 3.1 definition."""

    def __init__(self, what: str, where: str, reason: str) -> None:
        self.what = what
        self.where = where
        self.reason = reason
        super().__init__(f"{what}: {where or '(top level)'}: {reason}")


@dataclass(frozen=True)
class Operation:
    """One operation of the definition: method, path template and its raw OpenAPI entry."""

    method: str
    template: str
    pattern: re.Pattern[str]
    spec: dict[str, Any]
    parameters: tuple[dict[str, Any], ...]

    @property
    def operation_id(self) -> str:
        """Return the operationId."""
        return str(self.spec.get("operationId", f"{self.method} {self.template}"))

    def path_params(self, path: str) -> dict[str, str]:
        """Return the path parameters of a concrete path."""
        m = self.pattern.match(path)
        return m.groupdict() if m else {}


@functools.cache
def definition() -> dict[str, Any]:
    """Return the vendored OpenAPI definition (parsed once)."""
    text = resources.files("protocols.openadr3").joinpath("spec", _SPEC_FILE).read_text("utf-8")
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _convert(node: Any) -> Any:
    """Turn one OpenAPI 3.0 schema node into JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in _DROP}
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/$defs/")
    if node.get("exclusiveMaximum") is True and "maximum" in node:
        out["exclusiveMaximum"] = out.pop("maximum")
    if node.get("exclusiveMinimum") is True and "minimum" in node:
        out["exclusiveMinimum"] = out.pop("minimum")
    disc = node.get("discriminator")
    if isinstance(disc, dict) and "oneOf" in node:  # notification.object: one schema per objectType
        prop = disc["propertyName"]
        branches = [
            {"if": {"properties": {prop: {"const": ref["$ref"].rsplit("/", 1)[-1].upper()}}}, "then": _convert(ref)}
            for ref in node["oneOf"]
        ]
        del out["oneOf"]
        out["required"] = sorted({*out.get("required", []), prop})
        out["allOf"] = [*out.get("allOf", []), *branches]
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def _without_object_type(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a request schema less its own objectType (for the response composition)."""
    patched = copy.deepcopy(schema)
    patched["properties"].pop("objectType", None)
    patched["required"] = [r for r in patched.get("required", []) if r != "objectType"]
    return patched


@functools.cache
def _defs() -> dict[str, Any]:
    """Return every component schema converted to JSON Schema (with the two corrections)."""
    schemas = definition()["components"]["schemas"]
    defs = {name: _convert(s) for name, s in schemas.items()}
    for response, request in (("ven", "BlVenRequest"), ("resource", "BlResourceRequest")):
        defs[f"_{request}Body"] = _without_object_type(defs[request])
        defs[response]["allOf"] = [{"$ref": "#/$defs/objectMetadata"}, {"$ref": f"#/$defs/_{request}Body"}]
    return defs


_FORMATS = FormatChecker(formats=())
_FORMATS.checks("date-time")(is_datetime)


@functools.cache
def _validator_for(schema_json: str) -> Draft202012Validator:
    """Return a validator for one converted schema (cached by its text)."""
    schema = {"$defs": _defs(), **json.loads(schema_json)}
    return Draft202012Validator(schema, format_checker=_FORMATS)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Return a (cached) validator for a converted schema fragment."""
    return _validator_for(json.dumps(schema, sort_keys=True))


def _check(what: str, schema: dict[str, Any], value: Any) -> None:
    """Raise SchemaRejected naming the first place ``value`` departs from ``schema``."""
    error = best_match(_validator(schema).iter_errors(value))
    if error is None:
        return
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    raise SchemaRejected(what, where, error.message[:300])


def validate(name: str, value: Any) -> None:
    """Validate ``value`` against the component schema ``name`` (e.g. "event", "notification")."""
    if name not in _defs():
        raise KeyError(f"no schema {name!r} in the OpenADR {SPEC_VERSION} definition")
    _check(name, {"$ref": f"#/$defs/{name}"}, value)


@functools.cache
def operations() -> tuple[Operation, ...]:
    """Return every operation of the definition."""
    out = []
    for template, item in definition()["paths"].items():
        common = tuple(item.get("parameters", ()))
        regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        for method in _METHODS:
            if method in item:
                spec = item[method]
                params = common + tuple(spec.get("parameters", ()))
                out.append(Operation(method.upper(), template, re.compile(regex), spec, params))
    return tuple(out)


def find_operation(method: str, path: str) -> Operation | None:
    """Return the operation serving ``method path`` (path relative to the base URL), or None."""
    for op in operations():
        if op.method == method.upper() and op.pattern.match(path):
            return op
    return None


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a components/responses $ref."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/responses/"):
        resolved = definition()["components"]["responses"][ref.rsplit("/", 1)[-1]]
        assert isinstance(resolved, dict)
        return resolved
    return node


def _content_schema(node: dict[str, Any]) -> dict[str, Any] | None:
    """Return the JSON (or form) body schema of a request body or response, converted."""
    content = _resolve(node).get("content") or {}
    for media in ("application/json", "application/x-www-form-urlencoded"):
        if media in content and "schema" in content[media]:
            converted = _convert(content[media]["schema"])
            assert isinstance(converted, dict)
            return converted
    return None


def validate_request(op: Operation, body: Any) -> None:
    """Validate a request body against the operation's requestBody schema."""
    spec = op.spec.get("requestBody")
    if spec is None:
        if body is not None:
            raise SchemaRejected(f"{op.operation_id} request", "", "this operation takes no body")
        return
    schema = _content_schema(spec)
    if body is None:
        if spec.get("required"):
            raise SchemaRejected(f"{op.operation_id} request", "", "a body is required")
        return
    if schema is not None:
        _check(f"{op.operation_id} request", schema, body)


def validate_response(op: Operation, status: int, body: Any) -> None:
    """Validate a response body against the schema the operation declares for ``status``."""
    responses = op.spec.get("responses", {})
    spec = responses.get(str(status))
    if spec is None:
        if 400 <= status < 600:  # any error must be a problem object (Definition: Problem)
            _check(f"{op.operation_id} {status}", {"$ref": "#/$defs/problem"}, body)
            return
        raise SchemaRejected(f"{op.operation_id} response", "", f"status {status} is not declared")
    schema = _content_schema(spec)
    if schema is not None:
        _check(f"{op.operation_id} {status}", schema, body)


def validate_query(op: Operation, query: dict[str, list[str]]) -> dict[str, Any]:
    """Validate query parameters (each a list of raw strings); return them typed."""
    declared = {p["name"]: p for p in op.parameters if p.get("in") == "query"}
    out: dict[str, Any] = {}
    for name, raw in query.items():
        param = declared.get(name)
        if param is None:
            raise SchemaRejected(f"{op.operation_id} query", name, "not a parameter of this operation")
        schema = _convert(param.get("schema", {}))
        typ = param.get("schema", {}).get("type")
        value: Any = raw if typ == "array" else raw[-1]
        try:
            if typ == "integer":
                value = int(value)
            elif typ == "boolean":
                if value not in ("true", "false"):
                    raise ValueError(value)
                value = value == "true"
        except ValueError:
            raise SchemaRejected(f"{op.operation_id} query", name, f"{value!r} is not a {typ}") from None
        _check(f"{op.operation_id} query {name}", schema, value)
        out[name] = value
    return out
