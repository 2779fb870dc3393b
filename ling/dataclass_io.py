"""Typed dataclasses ⇄ plain dicts (YAML / JSON), with errors that name the bad key.

One set of dataclasses is the single source for CLI flags, YAML configs, `--print-config`
and `config.json`; this module is the dict side of that. An unknown key is an error that
names the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from ling.errors import LingError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: 1.1 wants a dot, so `3e-3` and `1e3`
    would be strings (the resolver list below is PyYAML's, with the dot made optional)."""


_Yaml12Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Yaml12Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in _Yaml12Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"]
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text as plain data, every number a user may write read as a number."""
    return yaml.load(text, Loader=_Yaml12Loader)


def integral(text: str) -> int:
    """A whole number however it is written: 1000, 1_000, 1e3, 1000.0 (not 2.5)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # ValueError for what is no number at all
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def closest(name: str, choices: list[str]) -> str | None:
    """The valid name a user most likely meant, or None if nothing is close."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_message(key: str, valid: list[str], where: str = "") -> str:
    place = f" in {where}" if where else ""
    hint = closest(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid])
    if hint is not None:
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return f"unknown key '{key}'{place}; did you mean '{prefix}{hint}'?"
    return f"unknown key '{key}'{place}; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except LingError as e:
                errors.append(str(e))
        raise LingError(errors[0] if errors else f"bad value for '{key}'")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = closest(str(value), [str(c) for c in choices])
            extra = f"; did you mean '{hint}'?" if hint else ""
            raise LingError(
                f"'{key}'{' in ' + where if where else ''} must be one of "
                f"{', '.join(map(str, choices))}, got {value!r}{extra}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise LingError(f"'{key}'{' in ' + where if where else ''} must be a mapping, got {value!r}")
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LingError(f"'{key}'{' in ' + where if where else ''} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, key, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise LingError(f"'{key}'{' in ' + where if where else ''} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():  # max_steps: 1e3
        return int(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, float):
        return value
    elif isinstance(tp, type) and tp not in (int, float, str, bool) and isinstance(value, tp):
        return value
    raise LingError(
        f"'{key}'{' in ' + where if where else ''} must be of type "
        f"{getattr(tp, '__name__', tp)}, got {value!r}"
    )


def from_dict(cls: type, data: dict, where: str = "", prefix: str = "", partial_base: Any = None):
    """Build dataclass `cls` from `data`, validating every key and value.

    `where` names the source (a file) for error messages. With `partial_base`, missing
    keys keep the base instance's values (a YAML file that sets only some keys).
    """
    if not isinstance(data, dict):
        raise LingError(f"{where or 'config'}: expected a mapping at '{prefix.rstrip('.') or 'top level'}'")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise LingError(unknown_key_message(prefix + key, [prefix + k for k in fields], where))
        tp = hints[key]
        base_value = getattr(partial_base, key) if partial_base is not None else None
        if dataclasses.is_dataclass(base_value) and isinstance(value, dict):
            kwargs[key] = from_dict(type(base_value), value, where, prefix + key + ".", base_value)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key, where)
    if partial_base is not None:
        return dataclasses.replace(partial_base, **kwargs)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise LingError(f"{where or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
