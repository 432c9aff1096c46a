"""The check that a JSON payload is a record of its artifact kind: the required keys of its
record (:mod:`em_circuits.core.schemas`) present, each holding a value of the annotated basic
type (containers by their outer type only)."""

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from em_circuits.core.schemas import RECORDS, REQUIRED_KEYS


class _Check(typing.NamedTuple):
    accepts: typing.Callable[[Any], bool]
    what: str


_SIMPLE = {
    str: _Check(lambda v: isinstance(v, str), "a string"),
    bool: _Check(lambda v: isinstance(v, bool), "true or false"),
    int: _Check(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: _Check(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    type(None): _Check(lambda v: v is None, "null"),
}
_OBJECT = _Check(lambda v: isinstance(v, dict), "an object")
_LIST = _Check(lambda v: isinstance(v, list), "a list")


def _check_of(hint: Any) -> _Check | None:
    """A basic-type check for an annotation (containers only by their outer type); None = any."""
    origin = get_origin(hint)
    if hint in _SIMPLE:
        return _SIMPLE[hint]
    if origin is Literal:
        allowed = get_args(hint)
        return _Check(
            lambda v: isinstance(v, str) and v in allowed, "one of " + ", ".join(map(repr, allowed))
        )
    if origin in (typing.Union, types.UnionType):
        parts = [_check_of(arg) for arg in get_args(hint)]
        checks = [part for part in parts if part is not None]
        if len(checks) < len(parts):
            return None  # one alternative accepts anything, so the union does too
        return _Check(
            lambda v: any(c.accepts(v) for c in checks), " or ".join(c.what for c in checks)
        )
    if hint is dict or origin is dict or typing.is_typeddict(hint):
        return _OBJECT
    if hint is list or origin is list:
        return _LIST
    return None


_CHECKS: dict[str, dict[str, _Check]] = {
    kind: {
        key: check
        for key in REQUIRED_KEYS[kind]
        if (check := _check_of(typing.get_type_hints(record)[key])) is not None
    }
    for kind, record in RECORDS.items()
}


def _found(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: f"the string {str(value)[:40]!r}",
        bool: str(value).lower(),
        type(None): "null",
    }
    return names.get(type(value), f"{type(value).__name__} {value!r}"[:60])


def record_problems(kind: str, data: Mapping[str, Any]) -> list[str]:
    """What keeps ``data`` from being a ``kind`` record: missing required keys first, then
    required keys whose value has the wrong basic type. Empty when it is fine."""
    if kind not in RECORDS:
        raise ValueError(f"unknown artifact kind {kind!r}; kinds are {', '.join(RECORDS)}")
    missing = [key for key in REQUIRED_KEYS[kind] if key not in data]
    problems = [f"missing field(s) {', '.join(missing)}"] if missing else []
    for key, check in _CHECKS[kind].items():
        if key in data and not check.accepts(data[key]):
            problems.append(f"field {key!r} should be {check.what}, found {_found(data[key])}")
    return problems
