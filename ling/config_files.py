"""Command configs from YAML: a command's argument dataclass built from `--config` files.

Shared by the CLI (files, then flags on top) and by commands that build another command's
config themselves (`ling sweep`'s trials). Required fields start as `tyro.MISSING` so a file
can fill them; an unknown key is an error naming the closest valid one (`ling.dataclass_io`).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import tyro
import yaml

from ling.dataclass_io import from_dict, load_yaml
from ling.errors import LingError


def required_placeholder(cls):
    """An instance of `cls` whose required fields are tyro.MISSING (so YAML can fill them)."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = required_placeholder(hints[f.name])
        else:
            values[f.name] = tyro.MISSING
    obj = object.__new__(cls)  # skip __post_init__: placeholders are not yet valid values
    for k, v in values.items():
        object.__setattr__(obj, k, v)
    return obj


def named_value(flag: str, args: list[str]) -> str | None:
    """The value given to `--flag VALUE` / `--flag=VALUE` in argv (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def yaml_mapping(file: str) -> dict:
    path = Path(file)
    if not path.exists():
        raise LingError(f"{file}: config file not found")
    if path.is_dir():
        raise LingError(f"{file}: is a directory, not a YAML config file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise LingError(f"{file}: not a YAML config file (not UTF-8 text)") from None
    except OSError as e:
        raise LingError(f"{file}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LingError(f"{file}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LingError(f"{file}: expected a mapping of config keys at the top level")
    return data


def model_templates(cls, obj, files: list = (), args: list[str] = ()):
    """`obj` with each `ModelConfig` field made a template (see `ling.config.unresolved`), so
    that YAML keys and flags such as `--model.n-embd` re-derive head_dim and friends. A
    preset named by `--FIELD.name PRESET` (flag, else YAML) replaces the field's default.
    `files` are YAML paths or mappings already read."""
    from ling.config import PRESETS, ModelConfig, unresolved

    def _complete(section: dict) -> bool:
        return all(field.name in section for field in dataclasses.fields(ModelConfig))

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is not ModelConfig:
            continue
        name = named_value(f"--{f.name}.name", list(args))
        if name is None:
            for file in files:
                section = (file if isinstance(file, dict) else yaml_mapping(file)).get(f.name)
                if isinstance(section, dict) and "name" in section:
                    name = section["name"]
                    if _complete(section) and name not in PRESETS:
                        name = "custom"  # a run's own config.yaml: every field is there, the name only says where it came from
        if name is not None:
            value = ModelConfig() if name == "custom" else ModelConfig.from_name(str(name))
        else:
            value = getattr(obj, f.name)
        object.__setattr__(obj, f.name, unresolved(value))
    return obj


def load_yaml_config(cls, files: list[str], base=None):
    """Apply YAML files, in order, on top of `base` (or the class defaults)."""
    config = base if base is not None else required_placeholder(cls)
    for file in files:
        config = from_dict(cls, yaml_mapping(file), where=file, partial_base=config)
    return config


def config_from_mapping(cls, data: dict, where: str):
    """`cls` built from one mapping as `--config FILE` alone would build it (presets, derived
    model fields, validation), with every required field set."""
    from ling.config import ModelConfig

    base = model_templates(cls, required_placeholder(cls), [data])
    config = from_dict(cls, data, where=where, partial_base=base)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and getattr(config, f.name) is tyro.MISSING]
    if missing:
        raise LingError(f"{where}: no value for the required key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    derived = {f.name: dataclasses.replace(getattr(config, f.name))  # a template derives head_dim etc. again
               for f in dataclasses.fields(cls) if hints[f.name] is ModelConfig}
    return dataclasses.replace(config, **derived)
