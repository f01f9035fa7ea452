"""Configs are dataclasses filled from defaults <- a YAML file <- `key.sub=value` CLI overrides.

Every mistake (unknown key, wrong type, missing required value) raises `ConfigError` with a one-line
message naming the dotted key, and for an unknown key the closest valid one. Nothing distributed happens
here, so a bad config stops a run before any process group exists.
"""

import dataclasses
import difflib
import enum
import os
import sys
import typing
from typing import Any, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")

__all__ = ["MISSING", "ConfigError", "Choice", "parse_args", "load_config", "config_to_yaml", "dump_config"]


class ConfigError(ValueError):
    """A config the run cannot start with. The message names the key."""


class Choice(str, enum.Enum):
    """Base of a config field with a fixed set of values: OmegaConf rejects any other value (naming the key and
    the allowed values), and the field compares and prints as its plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec) -> str:
        return format(str(self.value), spec)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _all_keys(cls, prefix="") -> list:
    """Every dotted key a dataclass tree accepts (used for 'did you mean')."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        keys.append(prefix + f.name)
        if _is_dataclass_type(tp):
            keys.extend(_all_keys(tp, prefix + f.name + "."))
    return keys


def _check_keys(cls, values: Any, prefix: str, root_cls) -> None:
    """Reject keys that are not fields of the dataclass tree, suggesting the closest valid key."""
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(cls)
    fields = {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            candidates = _all_keys(root_cls)
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            if not close:  # a misspelt leaf under the right parent: compare leaf names too
                leafs = {c.rsplit(".", 1)[-1]: c for c in candidates}
                close = [leafs[m] for m in difflib.get_close_matches(str(key), list(leafs), n=1, cutoff=0.6)]
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        if _is_dataclass_type(fields[key]):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; expected a mapping, got {value!r}")
            _check_keys(fields[key], value, full + ".", root_cls)


def _dotlist_to_dict(dotlist: Sequence[str]) -> dict:
    out: dict = {}
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"bad command-line argument '{item}': expected key=value (e.g. model.dim=64)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad command-line key '{key}' in '{item}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line key '{key}' sets a sub-key of a value")
        node[parts[-1]] = value
    return out


def load_config(cls: Type[T], config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Build a `cls` instance from defaults <- YAML file <- dotlist overrides, or raise ConfigError."""
    layers = []
    if config_path:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config file '{config_path}' does not exist")
        try:
            with open(config_path) as f:
                file_values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{config_path}' is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file '{config_path}' must hold a mapping at the top level")
        layers.append(file_values)
    layers.append(_dotlist_to_dict(overrides))
    for layer in layers:
        _check_keys(cls, layer, "", cls)
    try:
        conf = OmegaConf.structured(cls)
        for layer in layers:
            conf = OmegaConf.merge(conf, OmegaConf.create(layer))
        obj = OmegaConf.to_object(conf)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required config value '{e.full_key}' "
                          f"(set it in the YAML or as {e.full_key}=...)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).split("\n")[0]
        raise ConfigError(f"invalid value for config key '{key}': {msg}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_args(cls: Type[T], argv: Optional[Sequence[str]] = None) -> T:
    """Parse `config=<yaml> key.sub=value ...` (sys.argv[1:] by default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    overrides = []
    for item in argv:
        if item.startswith("config="):
            config_path = item.split("=", 1)[1]
        elif item.startswith("--config="):
            config_path = item.split("=", 1)[1]
        else:
            overrides.append(item)
    return load_config(cls, config_path, overrides)


def config_to_yaml(obj) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def config_to_dict(obj) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), enum_to_str=True)


def dump_config(obj, path: str) -> None:
    """Write the resolved config atomically."""
    from lingua.files import atomic_write

    atomic_write(path, config_to_yaml(obj))
