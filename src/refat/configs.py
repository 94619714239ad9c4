"""Config dataclasses from YAML/JSON mappings and from command-line options, checked strictly.

Every config in refat is a dataclass; this module turns a mapping (a YAML file's section) or parsed
command-line options into one, naming the exact key whenever a key is unknown or a value has the
wrong type, so a typo fails before any long work starts. Each dataclass checks its own values in
``__post_init__`` with :func:`require` / :func:`at_least`, naming the field; whoever builds it adds
the section (``train.refat.p``) or the option (``--refat-p``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import linecache
import re
import tokenize
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from .errors import RefatError

__all__ = ["ConfigError", "FieldError", "add_arguments", "added", "at_least", "field_comments", "fingerprint_data",
           "from_arguments", "from_dict", "require"]

T = TypeVar("T")


class ConfigError(RefatError, ValueError):
    """A config key that does not exist or a value of the wrong type (the message names the key)."""


class FieldError(ConfigError):
    """A bad value found by a dataclass's own checks; ``field`` is relative to that dataclass, so whoever
    built it (:func:`from_dict`, :func:`from_arguments`, an enclosing config) puts its section in front."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def require(ok: bool, field: str, message: str) -> None:
    """A ``__post_init__`` check: raise :class:`FieldError` naming ``field`` unless ``ok``."""
    if not ok:
        raise FieldError(field, message)


def at_least(config: Any, low: float, *fields: str, strict: bool = False) -> None:
    """:func:`require` each named field of ``config`` to be >= ``low`` (> if ``strict``); None passes (unset)."""
    for name in fields:
        value = getattr(config, name)
        require(value is None or (value > low if strict else value >= low), name,
                f"must be {'>' if strict else '>='} {low}, got {value}")


_OMIT_DEFAULT = "omit-default"


def added(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field added after stage fingerprints and checkpoint keys were frozen: :func:`fingerprint_data`
    leaves it out while it holds its default, so every config written before it keeps its keys (a cache
    key changes only when the new option is used)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"fingerprint": _OMIT_DEFAULT})


def fingerprint_data(config: Any) -> dict[str, Any]:
    """``asdict(config)`` without the :func:`added` fields (at any depth) that hold their default: what a
    fingerprint hashes."""
    data = dataclasses.asdict(config)
    _drop_added(config, data)
    return data


def _drop_added(config: Any, data: dict[str, Any]) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("fingerprint") == _OMIT_DEFAULT:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value == default:
                del data[f.name]
                continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _drop_added(value, data[f.name])


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
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except FieldError as e:  # the dataclass's own validation, naming its field
        raise ConfigError(f"{where}.{e.field}: {e.message}") from e
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _parser(hint: Any, optional: bool) -> Callable[[str], Any] | None:
    """Text -> value for one option value of type ``hint`` (int, float, str or a Literal of them); None if
    no text can express it. ``optional``: 'none' means None."""
    choices = get_args(hint) if get_origin(hint) is Literal else None
    base = type(choices[0]) if choices else hint
    if base not in (int, float, str):
        return None

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, choices))}")
        return value
    return parse


class _Collect(argparse.Action):
    """A list option's values: 'none' alone clears an optional field; one value of an ``X | list[X]`` field
    stays X (as the same field written in YAML would)."""

    def __init__(self, option_strings, dest, *, kind: type, single: bool, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.kind, self.single = kind, single

    def __call__(self, parser, namespace, values, option_string=None):
        if None in values:
            if len(values) > 1:
                raise argparse.ArgumentError(self, "'none' must be the only value")
            value = None
        else:
            value = values[0] if self.single and len(values) == 1 else self.kind(values)
        setattr(namespace, self.dest, value)


def _option(hint: Any, default: Any) -> dict[str, Any] | None:
    """``add_argument`` keywords for a field of type ``hint``; None if no option can express it."""
    union = get_origin(hint) in (typing.Union, types.UnionType)
    members = [a for a in get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and len(members) < len(get_args(hint))
    lists = [m for m in members if get_origin(m) in (list, tuple)]
    help_text = f"default: {default}" + (" ('none' to unset)" if optional else "")
    if members == [bool] and not optional:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if len(members) == 1 and not lists:
        parse = _parser(members[0], optional)
        choices = get_args(members[0]) if get_origin(members[0]) is Literal else None
        return parse and {"type": parse, "help": help_text,
                          "metavar": "{" + ",".join(map(str, choices)) + "}" if choices else None}
    if len(lists) != 1 or len(members) - len(lists) > 1:
        return None
    kind, (item, *rest) = get_origin(lists[0]), get_args(lists[0]) or (str,)
    single = len(members) == 2
    if rest not in ([], [Ellipsis]) or (single and item not in members):
        return None  # a fixed-length tuple, or a union of a list with another type than its items'
    parse = _parser(item, optional)
    return parse and {"type": parse, "nargs": "+" if single else "*", "action": _Collect, "kind": kind,
                      "single": single, "help": help_text + ("; one value or several" if single else "")}


def _class_source(cls: type) -> str:
    """The lines of ``cls``'s body, found by its ``class`` line and their indentation. Not inspect.getsource: that
    parses the whole module, and every command's start-up paid about 0.2 s for it over the config classes."""
    lines = linecache.getlines(inspect.getsourcefile(cls) or "")
    header = re.compile(rf"(\s*)class {cls.__name__}\b")
    for i, line in enumerate(lines):
        if m := header.match(line):
            indent, end = len(m.group(1)), i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            return "".join(lines[i:end])
    raise OSError(f"no source for {cls.__qualname__}")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of dataclass ``cls``: the one after it on its line with its aligned
    continuation lines (``#   more``), else the comment block just above it. The options' help, so the config
    dataclasses stay the one place a setting is explained."""
    try:
        source = _class_source(cls)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError):
        return {}
    comments, code = {}, set()
    for t in tokens:
        if t.type == tokenize.COMMENT:
            comments[t.start[0]] = t.string
        elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.add(t.start[0])
    names, docs, above, current = {f.name for f in dataclasses.fields(cls)}, {}, [], None
    for no, line in enumerate(source.splitlines(), 1):
        comment = comments.get(no)
        text = comment.lstrip("#").strip() if comment else ""
        if no in code:
            m = re.match(r"\s*(\w+)\s*:", line)
            name = m.group(1) if m and m.group(1) in names and m.group(1) not in docs else None
            if name and (text or above):
                docs[name] = text or " ".join(above)
            current, above = (name if name and text else None), []
        elif text and current and comment.startswith("#  "):  # an aligned continuation of the field's comment
            docs[current] += " " + text
        elif text:
            current = None
            above.append(text)
        else:
            current, above = None, []
    return docs


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Collection[str] = (), prefix: str = "",
                  aliases: Mapping[str, str | Sequence[str]] | None = None, defaults: Any = None) -> None:
    """One ``--field-name`` option per field of ``cls`` (defaults from the dataclass), so a command reaches
    every field without restating it. A nested dataclass's fields are flattened under its name
    (``lora.r`` -> ``--lora-r``); bools get ``--x/--no-x``, lists take several values ('none' clears an
    optional one). ``skip`` and ``aliases`` (extra option strings, e.g. an old name) take dotted field
    paths. ``defaults``: an instance of ``cls`` whose values are this command's defaults (a command that
    deliberately differs from the library's, e.g. the demo's selection). A field no option can express
    raises TypeError here, instead of being silently unreachable."""
    _add(parser, cls, set(skip), dict(aliases or {}), prefix, "", cls() if defaults is None else defaults)


def _add(parser, cls: type, skip: set[str], aliases: dict, prefix: str, path: str, defaults: Any) -> None:
    hints, docs = get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        name = path + f.name
        if name in skip or not f.init:
            continue
        flag = f"{prefix}{f.name.replace('_', '-')}"
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _add(parser, hints[f.name], skip, aliases, f"{flag}-", f"{name}.", default)
            continue
        option = _option(hints[f.name], default)
        if option is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line option can express {hints[f.name]}; "
                            "skip it and set it in the command")
        if f.name in docs:  # argparse formats help with %: the comments' "25 %" must stay literal
            option["help"] = docs[f.name].replace("%", "%%") + f" ({option['help']})"
        extra = aliases.get(name, ())
        parser.add_argument(f"--{flag}", *([extra] if isinstance(extra, str) else extra),
                            dest=flag.replace("-", "_"), default=default, **option)


def from_arguments(cls: type[T], args: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> T:
    """The dataclass built from the options :func:`add_arguments` added (plus ``overrides``); a value the
    dataclass rejects raises :class:`ConfigError` naming its field and option."""
    return _build(cls, args, prefix, "", overrides)


def _build(cls: type[T], args: argparse.Namespace, prefix: str, path: str, overrides: dict[str, Any]) -> T:
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        flag = f"{prefix}{f.name.replace('_', '-')}"
        if f.name in overrides or not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], args, f"{flag}-", f"{path}{f.name}.", {})
        elif hasattr(args, flag.replace("-", "_")):
            values[f.name] = getattr(args, flag.replace("-", "_"))
    try:
        return cls(**values, **overrides)
    except FieldError as e:
        raise ConfigError(f"{path}{e.field} (--{prefix}{e.field.replace('_', '-')}): {e.message}") from e
