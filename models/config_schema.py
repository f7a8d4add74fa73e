"""`config.json` → `UnCLIPConfig`, checked against the config dataclasses as one schema.

Every key the file format writes is required, except those whose default is None (a stage a model
may not have); unknown keys are refused; each value must have its field's type (no "32" for 32, no
strings for numbers, lists of the right length for fixed tuples, one of the allowed words for
literal fields); and the whole config must be consistent (`configs.check_consistent`: widths,
head counts dividing widths, sizes). Every error is a `ConfigError` naming the file and the key,
so a hand-edited or truncated file never reaches the model as a silent fallback or a bare
`TypeError` deep inside a layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

from models import configs


class ConfigError(ValueError):
    """A config file that does not describe a valid model, naming the file and the key."""


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(hint, value, key: str, source: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must hold {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a finite number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{source}: {key}: no schema for {hint}")  # a new field type: extend this function


def _build(cls, values, path: str, source: str):
    if not isinstance(values, dict):
        where = path or "the top level"
        raise ConfigError(f"{source}: {where} must be a JSON object, got {_describe(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in values:
            if f.default is None:
                continue
            raise ConfigError(f"{source}: missing key {key}")
        kwargs[name] = _convert(hints[name], values[name], key, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"{source}: {path or 'config'}: {exc}") from None


def config_from_dict(data, source: str = "config") -> configs.UnCLIPConfig:
    """The checked `UnCLIPConfig` of a parsed config file (`source` names it in errors). A file of
    the one-stage format (`super_res` one UNet object, its steps in `sampling.super_res_steps`,
    as written before super-res became a chain) reads as that one-stage chain."""
    return _build(configs.UnCLIPConfig, _chain_from_one_stage(data), "", source)


def _chain_from_one_stage(data):
    """`data` with a one-stage-format `super_res` rewritten as a chain of that one stage (with a
    last-step model, as that format always had); anything else unchanged."""
    if not isinstance(data, dict) or not isinstance(data.get("super_res"), dict) or "unet" in data["super_res"]:
        return data
    data = dict(data)
    sampling = dict(data["sampling"]) if isinstance(data.get("sampling"), dict) else data.get("sampling")
    steps = sampling.pop("super_res_steps", 7) if isinstance(sampling, dict) else 7
    if sampling is not None:
        data["sampling"] = sampling
    data["super_res"] = [{"unet": data["super_res"], "steps": steps, "last_step_model": True, "tile": None,
                          "tile_overlap": 16}]
    return data


def read_config(path: str | Path) -> configs.UnCLIPConfig:
    """Read and check a `config.json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); the file is damaged, write it again") from None
    return config_from_dict(data, str(path))
