"""Checks shared by every config dataclass: each failure is a one-line ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Literal

from ne.errors import ConfigError


def check_choices(section: Any, name: str) -> None:
    """Every `Literal[...]` field of a config section holds one of its values."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        allowed = _literal_values(hints[f.name])
        if allowed is not None:
            check_literal(f"{name}.{f.name}", getattr(section, f.name), allowed)


def _literal_values(tp: Any) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_literal(key: str, value: Any, allowed: tuple) -> None:
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(f"{key} is {value!r}; choose one of {', '.join(map(repr, allowed))}")


def check_layer_list(key: str, layers: list[int]) -> None:
    if not layers:
        raise ConfigError(f"{key} is empty; list the layers to use, e.g. [0, 3], or null for every layer")
    for layer in layers:
        at_least(key, layer, 0, "layers are numbered from 0")
    twice = sorted({layer for layer in layers if layers.count(layer) > 1})
    if twice:
        raise ConfigError(f"{key} lists layer {twice[0]} more than once ({layers}); list each layer once")


def at_least(key: str, value: Any, low: int, hint: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key} is {value}; it must be at least {low}" + (f" ({hint})" if hint else ""))


def at_most(key: str, value: Any, high: int, hint: str = "") -> None:
    if value > high:
        raise ConfigError(f"{key} is {value}; it must be at most {high:,}" + (f" ({hint})" if hint else ""))


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} is {value}; it must be > 0")


def integer(name: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """`value` as an int for a public function's argument `name`, within [low, high) when they are given.

    Python and numpy integers pass; bools, floats, strings and None are refused, so that `query(layer="0")` or
    `neuron=5.5` is a type error rather than a search for something that does not exist."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(
            f"{name} is {value!r} ({type(value).__name__}); it must be an integer" + (f" ({hint})" if hint else "")
        )
    value = int(value)
    if low is not None and value < low or high is not None and value >= high:
        span = f"at least {low}" if high is None else f"at most {high - 1}" if low is None else f"in {low}..{high - 1}"
        raise ConfigError(f"{name} is {value}; it must be {span}" + (f" ({hint})" if hint else ""))
    return value
