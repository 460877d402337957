"""Typed dataclass fields, checked against their annotations: what the config tree is built on.

``check_fields(obj, where)`` checks every field of a dataclass instance (and conforms an int to a
float where a float is expected); errors name the key, the value given and what is accepted
(``Literal`` choices listed). ``at_least`` checks lower bounds.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal, get_args, get_origin


def at_least(where: str, **values: float) -> None:
    """``name=(value, minimum)`` pairs: each value must be >= its minimum."""
    for name, (value, low) in values.items():
        if value < low:
            raise ValueError(f"{where}.{name} must be >= {low}, got {value}")


def choices(hint: Any) -> str:
    return ", ".join(repr(a) for a in get_args(hint))


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return f"one of {choices(hint)}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {_describe(get_args(hint)[0])}"
    if origin is dict:
        return f"a table of {_describe(get_args(hint)[1])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (an int where a float is expected becomes a float), or a
    ValueError naming ``where``, what was given and what is accepted."""
    origin = get_origin(hint)
    ok = True
    if origin is Literal:
        ok = value in get_args(hint) and type(value) in {type(a) for a in get_args(hint)}
    elif origin in (types.UnionType, typing.Union):
        for arm in get_args(hint):
            try:
                return _conform(value, arm, where)
            except ValueError:
                continue
        ok = False
    elif origin is list:
        if isinstance(value, list):
            return [_conform(v, get_args(hint)[0], f"{where}[{i}]") for i, v in enumerate(value)]
        ok = False
    elif origin is dict:
        if isinstance(value, dict):
            return {k: _conform(v, get_args(hint)[1], f"{where}.{k}") for k, v in value.items()}
        ok = False
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (bool, str):
        ok = isinstance(value, hint)
    if not ok:
        raise ValueError(f"{where}: expected {_describe(hint)}, got {value!r}")
    return value


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass ``cls`` (computed once per class)."""
    return typing.get_type_hints(cls)


def check_fields(obj: Any, where: str) -> None:
    """Check (and conform) every field of dataclass ``obj`` against its annotation."""
    for f in fields(obj):
        hint = hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if is_dataclass(hint) or get_origin(hint) is list and is_dataclass(get_args(hint)[0]):
            continue  # sections check themselves
        setattr(obj, f.name, _conform(value, hint, f"{where}.{f.name}".lstrip(".")))
