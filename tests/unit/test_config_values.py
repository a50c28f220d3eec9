"""Every config key refuses values of the wrong kind: inf, nan, numbers past any sensible range, text
for numbers, numbers for text; each refusal names the key. Walks the schema, so new keys are covered."""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError

INF = float("inf")
NAN = float("nan")
REQUIRED = {
    "count": 1,
    "max_loss_fraction": 0.1,
    "tag": "main-a",
    "min_w": 1.0,
    "max_w": 2.0,
}  # keys a list or dict entry must have


@dataclass(frozen=True)
class Leaf:
    """One config key: its dotted path, its type, and how to build a config holding a value there."""

    path: str
    kind: Any
    place: Callable[[Any], dict[str, Any]]


def _plain(annotation: Any) -> Any:
    """Return ``annotation`` without ``| None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if get_origin(annotation) is Annotated:  # a constrained type (HttpUrl): its base type's bad values apply
        return get_args(annotation)[0]
    return annotation


def _leaves(model: type[BaseModel], prefix: str, place: Callable[[Any], dict[str, Any]]) -> list[Leaf]:
    """Return every key below ``model``; ``place(body)`` wraps a section body into a whole config."""
    out: list[Leaf] = []
    for name, field in model.model_fields.items():
        kind = _plain(field.annotation)
        path = f"{prefix}{name}"

        def here(value: Any, name: str = name, model: type[BaseModel] = model) -> dict[str, Any]:
            required = {k: v for k, v in REQUIRED.items() if k in model.model_fields and k != name}
            return {**required, name: value}

        def nest(body: dict[str, Any], name: str = name, place: Any = place, here: Any = here) -> dict[str, Any]:
            return place(here(body))

        args = get_args(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _leaves(kind, path + ".", nest)
        elif get_origin(kind) is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            out += _leaves(args[0], path + "[0].", lambda body, nest=nest: nest([body]))  # type: ignore[misc]
        elif get_origin(kind) is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            out += _leaves(args[1], path + ".flex1.", lambda body, nest=nest: nest({"flex1": body}))  # type: ignore[misc]
        else:
            out.append(Leaf(path, kind, lambda value, place=place, here=here: place(here(value))))
    return out


LEAVES = _leaves(GatewayConfig, "", lambda body: body)
NUMBER_LEAVES = [leaf for leaf in LEAVES if leaf.kind in (float, int)]


def _bad_values(kind: Any) -> list[Any]:
    """Return values no key of this type may take."""
    if kind is float:
        return [INF, -INF, NAN, 1e300, -1e300, "1.5", True, [1.0], {"a": 1.0}]
    if kind is int:
        return [1.5, INF, NAN, 10**18, -(10**18), "1", True, [1]]
    if kind is bool:
        return ["true", 1, 0.0, [True]]
    if kind is str:
        return [1, 2.5, INF, True, ["a"], {"a": "b"}]
    if get_origin(kind) is Literal:
        return ["not-one-of-them", 1, INF, True]
    if get_origin(kind) is dict:
        bad = _bad_values(get_args(kind)[1])
        return ["text", [1], *({"1": v} for v in bad)]
    if get_origin(kind) is list:
        bad = _bad_values(get_args(kind)[0])
        return ["text", {"a": 1}, *([v] for v in bad)]
    raise AssertionError(f"no bad values for {kind!r}: teach this test the new key type")


def _refused(leaf: Leaf, value: Any) -> ConfigError:
    """Return the ConfigError parse_config raises for ``value`` at ``leaf``; fail if it accepts it."""
    try:
        parse_config(leaf.place(value), "gw.toml")
    except ConfigError as err:
        return err
    raise AssertionError(f"{leaf.path} = {value!r} was accepted")


def test_the_walk_covers_every_section() -> None:
    paths = {leaf.path for leaf in LEAVES}
    assert len(paths) == len(LEAVES) > 100
    for key in (
        "battery.timeout_s",
        "openadr.max_clock_skew_s",
        "bms.max_flex_w",
        "gpus.groups[0].tdp_w",
        "gpus.tiers.flex1.weight",
        "meter.opcua.timeout_s",
        "openadr.simple_levels",
        "management.host",
    ):
        assert key in paths, key


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.path for leaf in LEAVES])
def test_every_key_refuses_values_of_the_wrong_kind(leaf: Leaf) -> None:
    """inf, nan, out-of-range numbers and values of another type are refused, naming the key."""
    for value in _bad_values(leaf.kind):
        err = _refused(leaf, value)
        assert err.path == "gw.toml"
        assert err.key == leaf.path or err.key.startswith((leaf.path + ".", leaf.path + "[")), (value, err)


@st.composite
def _garbage(draw: st.DrawFn) -> tuple[Leaf, Any]:
    """Draw a key and a value its type never takes."""
    leaf = draw(st.sampled_from(LEAVES))
    kind = leaf.kind
    text = st.text(max_size=12)
    huge = st.floats(min_value=1.01e15, max_value=1e308) | st.floats(min_value=-1e308, max_value=-1.01e15)
    non_finite = st.sampled_from([INF, -INF, NAN])
    if kind is float:
        value = draw(non_finite | huge | text | st.booleans() | st.lists(st.floats(), min_size=1, max_size=2))
    elif kind is int:
        value = draw(st.floats().filter(lambda f: not f.is_integer()) | non_finite | text | st.booleans())
    elif kind is bool:
        value = draw(text | st.integers() | st.floats())
    elif kind is str or get_origin(kind) is Literal:
        allowed = get_args(kind) if get_origin(kind) is Literal else ()
        value = draw(st.integers() | st.floats() | st.booleans() | text.filter(lambda t: t not in allowed))
        if kind is str and isinstance(value, str):
            value = [value]  # any text may be a name; a list of it is not
    else:
        value = draw(st.sampled_from(_bad_values(kind)))
    return leaf, value


@settings(max_examples=400, deadline=None, database=None)
@given(_garbage())
def test_random_garbage_is_refused_naming_its_key(case: tuple[Leaf, Any]) -> None:
    leaf, value = case
    err = _refused(leaf, value)
    assert err.key == leaf.path or err.key.startswith((leaf.path + ".", leaf.path + "[")), (value, err)


@settings(max_examples=400, deadline=None, database=None)
@given(st.sampled_from(NUMBER_LEAVES), st.floats(allow_nan=True, allow_infinity=True) | st.integers())
def test_a_number_that_is_accepted_is_usable(leaf: Leaf, value: float) -> None:
    """Whatever a number key accepts survives what `drgw run` does with it (audit JSON, timers, dates)."""
    if leaf.kind is int and isinstance(value, float):
        value = int(value) if math.isfinite(value) else value
    try:
        cfg = parse_config(leaf.place(value), "gw.toml")
    except ConfigError:
        return
    json.dumps(cfg.model_dump(mode="json"), allow_nan=False)  # record_config's first step
    if leaf.path.endswith("_s") and not leaf.path.endswith("_per_s"):  # a duration
        now = datetime.now(UTC)
        assert now - timedelta(seconds=value) < now + timedelta(seconds=abs(value) + 1)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[battery]\ntimeout_s = inf\n", "battery.timeout_s", "finite"),
        ("[openadr]\nmax_clock_skew_s = nan\n", "openadr.max_clock_skew_s", "finite"),
        ("[bms]\nmax_flex_w = -inf\n", "bms.max_flex_w", "finite"),
        ("[openadr]\nhistory_s = 1e12\n", "openadr.history_s", "366 days"),
        ("[openadr.report_resources]\nbattery = 'bess 1'\n", "openadr.report_resources.battery", "pattern"),
        ("[openadr.report_resources]\nsite = 'x'\n", "openadr.report_resources.site", "unknown key"),
        ("[battery]\ntimeout_s = '1'\n", "battery.timeout_s", "valid number"),
        ("[openadr]\nvtn_url = 'not a url'\n", "openadr.vtn_url", "not a http:// or https:// URL"),
        ("[gpus]\nnats_url = 'localhost:4222'\n", "gpus.nats_url", "URL"),
        ("[battery]\nhost = 'bess 1'\n", "battery.host", "neither an IP address nor a host name"),
        ("[management]\nhost = '0.0.0.0'\n", "management.host", "allow_non_loopback"),
        ("a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n", "(syntax)", "nested too deeply"),
        ("a = " + "[" * 3000 + "]" * 3000 + "\n", "(syntax)", "nested too deeply"),
    ],
)
def test_a_bad_file_is_refused_in_one_line(tmp_path: Path, text: str, key: str, reason: str) -> None:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert (info.value.path, info.value.key) == (str(p), key)
    assert reason in info.value.reason and "\n" not in str(info.value)


def test_a_non_loopback_management_bind_needs_the_operators_word(tmp_path: Path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text("[management]\nhost = '0.0.0.0'\nallow_non_loopback = true\n")
    assert load_config(p).management.host == "0.0.0.0"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.53"):
        p.write_text(f"[management]\nhost = '{host}'\n")
        assert load_config(p).management.host == host
    p.write_text("[management]\nenabled = false\nhost = '10.0.0.5'\n")  # not served, so nothing exposed
    assert load_config(p).management.host == "10.0.0.5"
