"""Reading a configuration: TOML in, `--set a.b=c` overrides applied, typed dataclasses out, validated.

Every problem is one `ConfigError` line naming the key and the fix (the CLI maps it to exit code 2). A
dataclass whose own checks raise `ValueError` (the federation's `ServerOptConfig`) states the field first
("lr must be > 0, ..."), and the loader puts the table in front of it. The resolved configuration is
written back as TOML into the run directory (`dumps`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from worldlm.config.schema import Config, DPConfig
from worldlm.config.validate import validate
from worldlm.errors import ConfigError, quoted, suggest


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        return _convert(value, args[-1], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")  # a bug in this file, not user input


def _build(cls: Any, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {quoted(path)}{suggest(key, names)}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own check (ServerOptConfig), which names the field first
        raise ConfigError(f"{where}.{exc}" if where else str(exc)) from exc


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.rounds=8), got {quoted(item)}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {quoted(item)}")
    try:  # a TOML literal (number, bool, list, quoted string) ...
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:  # ... or a bare string
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {quoted(k)} is not a table")
            node = nxt
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read TOML (or start from defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a TOML file such as configs/demo.toml")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {p}: {exc}") from exc
    cfg: Config = _build(Config, apply_overrides(raw, overrides), "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    def strip_none(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip_none(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, list):
            return [strip_none(v) for v in obj]
        return obj

    out = typing.cast(dict[str, Any], strip_none(dataclasses.asdict(cfg)))
    if cfg.dp == DPConfig():  # [dp] is written only when set, so configs of runs without DP stay as before
        del out["dp"]
    if not cfg.federation.offload_states:  # likewise, so complete earlier runs still match (experiments)
        del out["federation"]["offload_states"]
    return out


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))
