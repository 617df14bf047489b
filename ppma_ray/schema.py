"""Typed dataclass configs: plain data (YAML, JSON, ``--set``) in, checked dataclasses out.

Every component declares its own config dataclass; fields that need a range or a one-line meaning
use ``option(...)``, choices are ``Literal[...]`` types, and a class may add cross-field rules in a
``check(self) -> None`` method that raises ``ConfigError.at(key, problem)`` with a key relative to
the class. ``from_dict`` converts and checks everything, so a bad value fails when the config is
read (before Ray starts), with one line that names the dotted key:

    model.preset: 'vit_hge' is not one of vit_tiny, vit_small, vit_base, vit_large

This module imports neither torch nor Ray: reading and checking a config takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from dataclasses import MISSING, field


class ConfigError(ValueError):
    """A bad config file, override or value; the message names the dotted key (and where it came from)."""

    def __init__(self, message: str, key: str = "", problem: str = ""):
        super().__init__(message)
        self.key, self.problem = key, problem or message

    def __reduce__(self):  # Ray moves exceptions between processes
        return (type(self), (str(self), self.key, self.problem))

    @classmethod
    def at(cls, key: str, problem: str) -> "ConfigError":
        return cls(f"{key}: {problem}", key, problem)

    def under(self, where: str) -> "ConfigError":
        """The same problem, its key prefixed by the enclosing section's ``where``."""
        return ConfigError.at(_join(where, self.key) or "<root>", self.problem)


def option(default=MISSING, *, default_factory=MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, help: str = ""):
    """A dataclass field with an allowed range (checked on load) and a one-line meaning."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def describe(cls, where: str = "", defaults=None) -> list[tuple[str, str, str]]:
    """``(dotted key, default, meaning)`` of every setting of a config class, nested sections
    flattened (a ``dict[str, Section]`` as ``<name>``); the meaning adds the allowed choices or range.
    Defaults are those of ``cls()`` when it builds with no arguments (a section's own defaults may
    differ by where it sits, e.g. each stage's), else of each field."""
    if defaults is None:
        try:
            defaults = cls()
        except TypeError:  # a section with required fields
            defaults = None
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp = _join(where, f.name), hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not MISSING else "(required)"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key, default)
            continue
        value_type = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        if value_type is not None and dataclasses.is_dataclass(value_type):
            rows.append((key, "{}", f.metadata.get("help", "")))
            rows += describe(value_type, f"{key}.<name>")
            continue
        meaning = [f.metadata.get("help", "")]
        choices = _literal_choices(tp)
        if choices:
            meaning.append("one of " + ", ".join(map(str, choices)))
        bounds = [f"{sym} {f.metadata[k]}" for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if f.metadata.get(k) is not None]
        if bounds:
            meaning.append(" and ".join(bounds))
        shown = "null" if default is None else str(default) if default != "" else "(required)"
        rows.append((key, shown, "; ".join(m for m in meaning if m)))
    return rows


def _literal_choices(tp) -> tuple:
    """The choices of ``Literal[...]`` (or ``Literal[...] | None``), else ()."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ():
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return ()


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>a.b": 1}``: dotted keys, as ``--set`` and trackers name them."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def from_dict(cls, data, where: str = ""):
    """Build dataclass ``cls`` from plain data, checking keys, types, choices, ranges and rules."""
    return _convert(cls, data, where)


def check_all(obj, where: str = "") -> None:
    """Re-run the range and rule checks of a dataclass tree (after code changed it in place)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        _check_range(f, value, _join(where, f.name))
        for i, item in _children(value):
            if dataclasses.is_dataclass(item):
                check_all(item, _join(where, f.name) + i)
    _run_check(obj, where)


def _children(value):
    if dataclasses.is_dataclass(value):
        return [("", value)]
    if isinstance(value, dict):
        return [(f".{k}", v) for k, v in value.items()]
    return []


def _run_check(obj, where: str) -> None:
    check = getattr(obj, "check", None)
    if check is None:
        return
    try:
        check()
    except ConfigError as e:
        raise e.under(where) from None


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def _check_range(f: dataclasses.Field, value, where: str) -> None:
    if not f.metadata or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError.at(where, "must be a number, got nan")
    if not all(ok(value, f.metadata[op]) for op, _, ok in _BOUNDS if f.metadata.get(op) is not None):
        raise ConfigError.at(where, f"must be {_range(f.metadata)}, got {value!r}")


def _range(meta) -> str:
    return " and ".join(f"{word} {meta[op]:g}" for op, word, _ in _BOUNDS if meta.get(op) is not None)


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError.at(where or "<root>", f"expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        for key in value:
            if key not in fields:
                raise ConfigError.at(_join(where, key), f"unknown key (known: {', '.join(sorted(fields))})")
        kwargs = {}
        for k, v in value.items():
            kwargs[k] = _convert(hints[k], v, _join(where, k))
            _check_range(fields[k], kwargs[k], _join(where, k))
        try:
            obj = tp(**kwargs)
        except ConfigError as e:  # a __post_init__ that resolves fields (e.g. a model preset)
            raise e.under(where) from None
        _run_check(obj, where)
        return obj
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError.at(where, f"{value!r} is not one of {', '.join(str(c) for c in choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError.at(where, f"expected {_name(tp)}, got {value!r}")
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError.at(where, f"expected a mapping, got {value!r}")
        return {str(k): _convert(vt, v, _join(where, str(k))) for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError.at(where, f"expected a list, got {value!r}")
        return [_convert(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError.at(where, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError.at(where, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError.at(where, f"expected an integer, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError.at(where, f"expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError.at(where, f"unsupported type {tp}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp) -> str:
    names = []
    for a in typing.get_args(tp):
        if a is type(None):
            continue
        if typing.get_origin(a) is typing.Literal:
            names.append(" | ".join(str(c) for c in typing.get_args(a)))
        else:
            names.append(getattr(a, "__name__", str(a)))
    return " or ".join(names)


def to_dict(cfg) -> dict:
    """Plain, YAML/JSON-ready dict (tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))
