"""Configs: dataclasses read from TOML or YAML, with ``key=value`` overrides and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import PPDError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_VERSION = 1
T = TypeVar("T")


class ConfigError(PPDError):
    pass


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of keys; more is a mistake (or a bomb)
# Sane bounds of numeric keys, by name in any config class, checked at parse time with the key named. Past them a
# value overflows a seed or a step count, or a loop runs for hours instead of refusing. What a value means (lr > 0,
# t_min < t_max) is each class's validate(); None leaves that side to it. Keys not named get DEFAULT_LIMITS.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 10**8), "max_steps": (None, 10**8), "max_epochs": (None, 10**6), "batch_size": (None, 65536),
    "grad_accum": (None, 4096), "val_draws": (None, 1024), "val_every": (None, 10**8), "patience": (None, 10**6),
    "warmup_steps": (None, 10**8), "checkpoint_every": (None, 10**8), "keep_checkpoints": (None, 10**6),
    "log_every": (None, 10**8), "max_nan_steps": (None, 10**6), "proj_dim": (None, 65536), "beta": (None, 1e9),
    "token_noise": (0, 100), "redraws": (0, 1024), "samples": (1, 10**6), "steps": (1, 10**4), "threads": (0, 4096),
    "pretrain_steps": (0, 10**7),
}
DEFAULT_LIMITS = (-1e9, 1e9)


def _bounded(value: int | float, key: str) -> int | float:
    if not math.isfinite(value):  # NaN/inf: each class's validate() says what the key needs
        return value
    low, high = LIMITS.get(key.rsplit(".", 1)[-1], DEFAULT_LIMITS)
    lo = DEFAULT_LIMITS[0] if low is None else low
    hi = DEFAULT_LIMITS[1] if high is None else high
    if not lo <= value <= hi:
        span = f"at most {hi:g}" if low is None and value > hi else f"between {lo:g} and {hi:g}"
        raise ConfigError(f"Config key '{key}' must be {span}, got {value!r}. Fix it in the config file or with "
                          f"--set {key}=VALUE.")
    return value


def _read_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file {path} is a folder; give the .toml or .yaml file.")
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}." if not path.exists() else
                          f"Config file {path} is not a regular file (a pipe, socket or device).")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"Config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB; a config is a page of keys.")
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"Cannot read config file {path}: permission denied (reading it, not writing). Make it "
                          "readable for this user (chmod/chown).") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
                raise ConfigError(f"{path}: YAML aliases (*name) are not allowed in a config (nested aliases can "
                                  "expand to gigabytes); write the values out.")
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of keys.")
            return data
    except ConfigError:
        raise
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot parse ({e}).") from None
    raise ConfigError(f"{path}: config files are .toml or .yaml.")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}': expected a list, got {value!r}.")
        (inner, *_) = typing.get_args(typ) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"Config key '{key}': expected true/false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str)
                                                                             and not value.lstrip("-").isdigit()):
            raise ConfigError(f"Config key '{key}': expected an integer, got {value!r}.")
        if isinstance(value, str) and len(value) > 30:
            raise ConfigError(f"Config key '{key}': {value[:30]}... is far too large.")
        return _bounded(int(value), key)
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"Config key '{key}': expected a number, got {value!r}.") from None
        return _bounded(number, key)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"Config key '{key}': expected text, got {value!r}.")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown config key(s) {', '.join(prefix + k for k in unknown)}; known keys: "
                          f"{', '.join(prefix + k for k in fields)}.")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{prefix}{name}' is a section; write it as [{prefix}{name}].")
            # a section given in part keeps the parent's defaults for that section, not the section class's own
            f = fields[name]
            factory = f.default_factory if f.default_factory is not dataclasses.MISSING else typing.cast(Any, typ)
            base = factory()
            merged = {**dataclasses.asdict(base), **value}
            kwargs[name] = from_dict(typ, merged, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, typ, prefix + name)
    obj = cls(**kwargs)
    version = getattr(obj, "config_version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"config_version {version} is not supported (this PPD reads {CONFIG_VERSION}).")
    if prefix and hasattr(obj, "validate"):  # a section is checked now, before a long run starts, naming its keys
        try:
            obj.validate()
        except PPDError as e:
            raise ConfigError(f"In section [{prefix[:-1]}] (keys {prefix}KEY): {e}") from None
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "seed=3"]`` -> nested dict updates; values are parsed as TOML scalars when possible."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r}: write key=value, e.g. train.lr=1e-4.")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: '{p}' is not a section.")
        node[leaf] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    data = _read_file(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def to_toml(obj: Any) -> str:
    """The resolved config as TOML (``ppd-train ... --print-config``)."""
    def scalar(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    top, sections = [], []
    for k, v in to_dict(obj).items():
        if isinstance(v, dict):
            sections.append(f"\n[{k}]\n" + "".join(f"{kk} = {scalar(vv)}\n" for kk, vv in v.items()))
        else:
            top.append(f"{k} = {scalar(v)}\n")
    return "".join(top) + "".join(sections)
