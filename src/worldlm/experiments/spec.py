"""An experiment: a grid of runs (variants × methods × seeds) described in TOML, planned into run specs.

Every run has its directory `<out_root>/<name>/runs/<variant>/<method>/seed<k>/`; `experiments.run` trains the
grid and `experiments.report` writes its report.

Experiment file:

    name = "table1-nano"            # optional, default: the file's stem; results/<name>/
    description = "..."             # optional, shown in the report
    base = "../demo.toml"           # run config, relative to this file or to the working directory
    methods = ["worldlm", "fl"]     # worldlm, fl, hierfavg, fedper, centralized, local
    seeds = [0, 1, 2]               # optional, default [0]
    set = ["train.rounds=6"]        # optional --set overrides applied to every run
    [method_set]                    # optional: overrides per method, after `set` and before a variant's
    fl = ["train.lr_max=3e-3"]      #   (settings chosen per method on validation, e.g. its learning rate)
    [variants.NAME]                 # optional, default: one variant "default" without overrides
    description = "..."             # optional
    base = "../other.toml"          # optional: this variant's own run config (e.g. another tree)
    set = ["federation.nu=0"]       # its overrides, applied after the experiment's
    methods = ["worldlm"]           # optional subset of the experiment's methods
    seeds = [0, 1, 2]               # optional: this variant's own seeds (default: the experiment's)
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldlm import config as C
from worldlm.errors import ConfigError, quoted, suggest

TOP_KEYS = ("name", "description", "base", "methods", "seeds", "set", "method_set", "variants")
VARIANT_KEYS = ("description", "base", "set", "methods", "seeds")
GRID_KEYS = ("method", "seed", "name")  # set per run by the grid, never by an override
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    base: Path
    set: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    description: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    set: tuple[str, ...]
    variants: dict[str, Variant]
    method_set: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: its resolved config and run directory."""

    variant: str
    method: str
    seed: int
    cfg: C.Config
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.method}/seed{self.seed}"


# ---------------------------------------------------------------------------- the experiment file


def _check_keys(raw: dict[str, Any], valid: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {quoted(key)}{suggest(key, valid)}")


def _str(raw: dict[str, Any], key: str, default: str, where: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {quoted(key)} must be a string, got {value!r}")
    return value


def _str_list(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {quoted(key)} must be a list of strings, got {value!r}")
    return tuple(value)


def _safe_name(name: str, what: str, where: str) -> str:
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {what} {quoted(name)} must be letters, digits, '.', '_' or '-' (it names a directory)"
        )
    return name


def _methods(raw: dict[str, Any], where: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    methods = _str_list(raw, "methods", where)
    for m in methods:
        if m not in allowed:
            raise ConfigError(f"{where}: method {quoted(m)} is not {what}{suggest(m, allowed)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{where}: 'methods' lists a method twice: {list(methods)}")
    return methods


def _seeds(raw: dict[str, Any], where: str) -> tuple[int, ...]:
    seeds = raw.get("seeds", [0])
    valid = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not valid or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    return tuple(seeds)


def _overrides(items: Sequence[str], where: str) -> tuple[str, ...]:
    for item in items:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"{where}: override {quoted(item)} must be KEY=VALUE (e.g. train.rounds=6)")
        if key in GRID_KEYS:
            raise ConfigError(f"{where}: {quoted(key)} is set per run by the experiment grid (methods, seeds, name)")
    return tuple(items)


def _resolve_base(value: str, exp_path: Path, where: str) -> Path:
    """A base config path, relative to the experiment file first, then to the working directory."""
    for candidate in (exp_path.parent / value, Path(value)):
        if candidate.is_file():
            return Path(os.path.normpath(candidate))  # configs/demo.toml, not configs/experiments/../demo.toml
    raise ConfigError(
        f"{where}: base config {quoted(value)} not found (looked in {exp_path.parent} and the working directory)"
    )


def _variant(
    name: str, raw: Any, exp_path: Path, methods: tuple[str, ...], seeds: tuple[int, ...], base: Path | None
) -> Variant:
    where = f"{exp_path}: variants.{name}"
    _safe_name(name, "variant name", str(exp_path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([variants.{name}]), got {raw!r}")
    _check_keys(raw, VARIANT_KEYS, where)
    own_base = _resolve_base(_str(raw, "base", "", where), exp_path, where) if "base" in raw else base
    if own_base is None:
        raise ConfigError(f"{where}: no run config; give 'base' at the top of the file or in this variant")
    subset = _methods(raw, where, methods, "one of the experiment's methods") if "methods" in raw else methods
    if not subset:
        raise ConfigError(f"{where}: 'methods' is empty")
    own_seeds = _seeds(raw, where) if "seeds" in raw else seeds
    overrides = _overrides(_str_list(raw, "set", where), where)
    return Variant(name, _str(raw, "description", "", where), own_base, overrides, subset, own_seeds)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; see configs/experiments/")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read experiment file {path}: {exc}") from exc


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (not yet the run configs: see plan_runs)."""
    path = Path(path)
    raw = _read_toml(path)
    where = str(path)
    _check_keys(raw, TOP_KEYS, where)
    name = _safe_name(_str(raw, "name", path.stem, where), "name", where)
    base = _resolve_base(_str(raw, "base", "", where), path, where) if "base" in raw else None
    if "methods" not in raw:
        raise ConfigError(f'{where}: \'methods\' is missing (e.g. methods = ["worldlm", "fl"])')
    methods = _methods(raw, where, C.METHODS, "a known method")
    if not methods:
        raise ConfigError(f"{where}: 'methods' is empty")
    variants_raw = raw.get("variants", {"default": {}})
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"{where}: 'variants' must hold at least one [variants.NAME] table")
    seeds = _seeds(raw, where)
    variants = {v: _variant(v, r, path, methods, seeds, base) for v, r in variants_raw.items()}
    method_raw = raw.get("method_set", {})
    if not isinstance(method_raw, dict):
        raise ConfigError(f"{where}: 'method_set' must be a table of method = [\"KEY=VALUE\", ...]")
    _methods({"methods": list(method_raw)}, f"{where}: method_set", methods, "one of the experiment's methods")
    method_set = {m: _overrides(_str_list(method_raw, m, f"{where}: method_set"), where) for m in method_raw}
    return Experiment(
        name=name,
        path=path,
        description=_str(raw, "description", "", where),
        methods=methods,
        seeds=tuple(sorted({k for v in variants.values() for k in v.seeds})),  # every seed some variant runs
        set=_overrides(_str_list(raw, "set", where), where),
        variants=variants,
        method_set=method_set,
    )


# ---------------------------------------------------------------------------- the grid


def plan_runs(exp: Experiment, out_dir: Path, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Resolve every run's config up front, so a bad override fails before hours of training."""
    overrides = _overrides(overrides, "--set")
    specs = []
    for v in exp.variants.values():
        for method in v.methods:
            for seed in v.seeds:
                grid = [f'method="{method}"', f"seed={seed}", f'name="{exp.name}-{v.name}-{method}-seed{seed}"']
                try:
                    per_method = exp.method_set.get(method, ())
                    cfg = C.load_config(v.base, [*exp.set, *per_method, *v.set, *overrides, *grid])
                except ConfigError as exc:
                    raise ConfigError(f"{exp.path}: variant {quoted(v.name)} ({v.base}): {exc}") from exc
                specs.append(RunSpec(v.name, method, seed, cfg, out_dir / "runs" / v.name / method / f"seed{seed}"))
    return specs


def select_runs(
    exp: Experiment,
    specs: list[RunSpec],
    variants: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str] = (),
) -> list[RunSpec]:
    """The cells of these variants, seeds and methods (all when empty); unknown ones are a one-line ConfigError."""
    if unknown := [v for v in variants if v not in exp.variants]:
        raise ConfigError(f"{exp.path}: no variant {', '.join(unknown)}; variants: {', '.join(exp.variants)}")
    if unknown := [m for m in methods if m not in exp.methods]:
        raise ConfigError(f"{exp.path}: no method {', '.join(unknown)}; methods: {', '.join(exp.methods)}")
    if unknown_seeds := [str(k) for k in seeds if k not in exp.seeds]:
        raise ConfigError(
            f"{exp.path}: seed {', '.join(unknown_seeds)} is not in the experiment's seeds "
            f"({', '.join(map(str, exp.seeds))})"
        )
    return [
        s
        for s in specs
        if (not variants or s.variant in variants)
        and (not seeds or s.seed in seeds)
        and (not methods or s.method in methods)
    ]


def is_complete(spec: RunSpec) -> bool:
    """Done iff summary.json exists and config.toml is exactly this run's resolved config."""
    return (spec.dir / "summary.json").is_file() and C.same_config(spec.dir / "config.toml", spec.cfg)
