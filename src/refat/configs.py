"""Config dataclasses from YAML/JSON mappings and from command-line options, checked strictly.

Every config in refat is a dataclass; this module turns a mapping (a YAML file's section) or parsed
command-line options into one, naming the exact key whenever a key is unknown or a value has the
wrong type, so a typo fails before any long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = ["ConfigError", "add_arguments", "from_arguments", "from_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key that does not exist or a value of the wrong type (the message names the key)."""


def _check(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} fields, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        items = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got a boolean")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"{cls.__name__} takes {', '.join(names)}")
    try:
        return cls(**{k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the dataclass's own validation
        raise ConfigError(f"{where}: {e}") from e


def _scalar(hint: Any) -> tuple[Any, bool, tuple | None]:
    """(python type, optional, choices) for a command-line option; type None if not expressible."""
    origin, args = get_origin(hint), get_args(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            return None, optional, None
        hint, origin, args = rest[0], get_origin(rest[0]), get_args(rest[0])
    if origin is Literal:
        return type(args[0]), optional, args
    if hint in (int, float, str, bool):
        return hint, optional, None
    return None, optional, None


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """One ``--field-name`` option per scalar field of ``cls`` (defaults and choices from the dataclass)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        typ, optional, choices = _scalar(hints[f.name])
        if typ is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if typ is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default)
        else:
            parse = typ
            if optional:
                def parse(text, typ=typ):  # "none" clears an optional field
                    return None if text.lower() == "none" else typ(text)
            parser.add_argument(flag, dest=dest, type=parse, default=default, choices=choices,
                                help=f"default: {default}" + (" ('none' to unset)" if optional else ""))


def from_arguments(cls: type[T], args: argparse.Namespace, *, prefix: str = "", **overrides) -> T:
    """The dataclass built from the options :func:`add_arguments` added (plus ``overrides``)."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    return cls(**{**values, **overrides})
