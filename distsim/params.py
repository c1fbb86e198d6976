"""Parameter constraints declared as data: what a key accepts, and the one-line error when not.

Each section of a study (``[data]``, ``[[arch]]``, ``[train]``, ...) has one table
``{field: constraint}`` next to its dataclass; the dataclass's ``__post_init__`` runs
:func:`check_fields` on it, so a value is checked once, wherever it comes from (a TOML file
or Python). A constraint normalizes what it accepts (TOML arrays become tuples, integers
given for a number become floats) and raises :class:`~distsim.errors.ConfigError` naming
the key, e.g. ``train.epochs: must be an integer in [1, inf), got 0``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distsim.errors import ConfigError

NAME_PATTERN = "[A-Za-z0-9_.-]+"  # names that become folder names in the store


def type_name(value: Any) -> str:
    """The TOML word for a value's type (``integer``, ``float``, ``array``, ...)."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             tuple: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    return f"got {type_name(value)} {value!r}"


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo}"
    right = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
    return f"{left}, {right}"


class Constraint:
    """What one key accepts: ``check`` returns the normalized value or raises ConfigError."""

    def describe(self, plural: bool = False) -> str:
        """The accepted values in words: "an integer in [1, inf)" (plural: "integers in ...")."""
        raise NotImplementedError

    def check(self, value: Any, key: str) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of `kind` (int: an integer, not a boolean; float: any finite number, returned
    as float) between lo and hi, each end open or closed; None = unbounded."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def noun(self, plural: bool = False) -> str:
        singular, many = ("an integer", "integers") if self.kind is int else ("a number", "numbers")
        return many if plural else singular

    def describe(self, plural: bool = False) -> str:
        if self.lo is None and self.hi is None:
            return self.noun(plural)
        return f"{self.noun(plural)} in {_bounds(self.lo, self.hi, self.lo_open, self.hi_open)}"

    def check(self, value: Any, key: str) -> Any:
        allowed = int if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError.at(key, f"must be {self.noun()}, {_got(value)}")
        x = self.kind(value)
        if not math.isfinite(x):
            raise ConfigError.at(key, f"must be a finite number, got {x!r}")
        low = self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo)
        high = self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi)
        if low or high:
            raise ConfigError.at(key, f"must be {self.describe()}, got {x!r}")
        return x


def Integer(lo: int | None = None, hi: int | None = None) -> Interval:
    """An integer in [lo, hi] (a TOML integer; booleans are refused)."""
    return Interval(int, lo, hi)


def Number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Interval:
    """A finite number (integers accepted, returned as float) between lo and hi."""
    return Interval(float, lo, hi, lo_open, hi_open)


@dataclass(frozen=True)
class Options(Constraint):
    """One of a fixed set of strings (the science module that uses them owns the tuple)."""

    values: tuple[str, ...]

    def describe(self, plural: bool = False) -> str:
        return f"{'values among' if plural else 'one of'} {', '.join(self.values)}"

    def check(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError.at(key, f"must be {self.describe()}, {_got(value)}")
        if value not in self.values:
            raise ConfigError.at(key, f"must be {self.describe()}, got {value!r}")
        return value


@dataclass(frozen=True)
class Text(Constraint):
    """A string; ``pattern``: the whole string must match it (``""`` allowed when ``empty``)."""

    pattern: str | None = None
    empty: bool = True

    def describe(self, plural: bool = False) -> str:
        noun = "strings" if plural else "a string"
        return f"{noun} matching {self.pattern}" if self.pattern else noun

    def check(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError.at(key, f"must be a string, {_got(value)}")
        if not value.strip():
            if not self.empty:
                raise ConfigError.at(key, "must be a non-empty string")
            return value
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ConfigError.at(key, f"must match {self.pattern}, got {value!r}")
        return value


@dataclass(frozen=True)
class Flag(Constraint):
    """A boolean."""

    def describe(self, plural: bool = False) -> str:
        return "booleans" if plural else "true or false"

    def check(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError.at(key, f"must be true or false, {_got(value)}")
        return value


@dataclass(frozen=True)
class Array(Constraint):
    """An array of items (returned as a tuple): ``size`` items exactly (an int, or a tuple of
    the allowed lengths), or any number (at least one when ``nonempty``), pairwise different
    when ``distinct``."""

    item: Constraint
    size: int | tuple[int, ...] | None = None
    nonempty: bool = False
    distinct: bool = False

    def _sizes(self) -> tuple[int, ...] | None:
        return (self.size,) if isinstance(self.size, int) else self.size

    def describe(self, plural: bool = False) -> str:
        article = "arrays" if plural else "a non-empty array" if self.nonempty else "an array"
        sizes = self._sizes()
        count = f"{' or '.join(map(str, sizes))} " if sizes is not None else ""
        distinct = "distinct " if self.distinct else ""
        return f"{article} of {count}{distinct}{self.item.describe(plural=True)}"

    def check(self, value: Any, key: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise ConfigError.at(key, f"must be {self.describe()}, {_got(value)}")
        sizes = self._sizes()
        if (sizes is not None and len(value) not in sizes) or (self.nonempty and not value):
            raise ConfigError.at(key, f"must be {self.describe()}, got {list(value)!r}")
        items = tuple(self.item.check(v, f"{key}[{i}]") for i, v in enumerate(value))
        if self.distinct and len(set(items)) != len(items):
            raise ConfigError.at(key, f"must be {self.describe()}, got {list(value)!r}")
        return items


@dataclass(frozen=True)
class Maybe(Constraint):
    """``None`` (not set) or a value ``inner`` accepts."""

    inner: Constraint

    def describe(self, plural: bool = False) -> str:
        return f"{self.inner.describe(plural)} (or unset)"

    def check(self, value: Any, key: str) -> Any:
        return None if value is None else self.inner.check(value, key)


@dataclass(frozen=True)
class Either(Constraint):
    """A value the first of ``options`` that accepts it accepts (``words`` describes them)."""

    options: tuple[Constraint, ...]
    words: str

    def describe(self, plural: bool = False) -> str:
        return self.words

    def check(self, value: Any, key: str) -> Any:
        for option in self.options:
            try:
                return option.check(value, key)
            except ConfigError:
                continue
        raise ConfigError.at(key, f"must be {self.words}, got {value!r}")


Table = Mapping[str, Constraint]


def check_fields(obj: Any, section: str, table: Table) -> None:
    """Check (and normalize in place) every field of a frozen dataclass named in ``table``.

    Called from ``__post_init__``; errors name ``<section>.<field>``. A test asserts that
    each table names exactly its dataclass's fields.
    """
    for name, constraint in table.items():
        value = constraint.check(getattr(obj, name), f"{section}.{name}")
        object.__setattr__(obj, name, value)


def check_keys(given: Mapping[str, Any], allowed: Any, path: str, hint: str = "") -> None:
    """Refuse a key not in ``allowed`` (names the key and lists what is allowed)."""
    allowed = tuple(allowed)
    for key in given:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError.at(where, f"unknown key; allowed: {', '.join(sorted(allowed))}{hint}")


def init_fields(cls: type) -> tuple[str, ...]:
    """The constructor's field names of a dataclass, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)
