"""Typed dataclasses from YAML mappings: every field type-checked, `--set a.b=value` overrides, and errors
that name the source, the field, what was expected and what was found."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

# A decimal number as written by hand. YAML 1.1 (PyYAML) reads floats without a dot or without an exponent sign
# ("5e-4", "1e5", "1.0e5") as strings; float fields take them as the numbers they are.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration problem, naming the file, the field, what was expected and what was found."""

    def __init__(self, source: str, field_path: str, expected: str, got: Any):
        self.source, self.field_path, self.expected, self.got = source, field_path, expected, got
        super().__init__(f"{source}: field '{field_path}': expected {expected}, got {got!r}")


def require(ok: bool, source: str, field_path: str, expected: str, got: Any) -> None:
    """Raise the ConfigError naming `field_path` unless `ok`."""
    if not ok:
        raise ConfigError(source, field_path, expected, got)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, source: str, path: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(source, path, _type_name(tp), value)
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, source, path)
            except ConfigError as err:
                errors.append(err.expected)
        raise ConfigError(source, path, " or ".join(errors + ["null"] * (type(None) in options)), value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, path, f"a list of {_type_name(get_args(tp)[0])}", value)
        return [_coerce(v, get_args(tp)[0], source, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, path, "a boolean (true/false)", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, path, "a string", value)
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, source, path)
    raise TypeError(f"unsupported config type {tp} at {path}")


def build_dataclass(cls: type, data: Any, source: str, path: str = "") -> Any:
    """`cls(**data)` with every field type-checked; unknown keys get a did-you-mean error."""
    if not isinstance(data, dict):
        raise ConfigError(source, path or "<root>", "a mapping", data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(source, full, f"a known key{hint}; known: {', '.join(names)}", key)
        kwargs[key] = _coerce(value, hints[key], source, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError("--set", text, "KEY=VALUE (e.g. train.steps=100)", text)
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError("--set", key.strip(), "a YAML value", f"{raw} ({str(err).splitlines()[0]})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", text, f"'{key}' to be a section", node)
        node[keys[-1]] = value
    return data
