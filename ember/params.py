"""Run parameters: `params/<target>.yaml` profiles merged with overrides, validated into frozen dataclasses.

A params file has `experiment` (a module in ember.experiments), optional `base` values and `profiles`
(smoke / default / paper). Values resolve as base <- profile <- overrides; unknown keys and wrong types are
errors that name the key, the expected type and what was found.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from ember.errors import ParamsError

PROFILES = ("smoke", "default", "paper")


@dataclasses.dataclass(frozen=True)
class RunParams:
    """Fields every experiment shares; each experiment's `Params` extends it with its grid and workload."""

    target: str = ""
    profile: str = "smoke"
    model: str = "tiny-qwen3"
    dtype: str = "float32"
    device: str = "auto"
    warmup: int = 1
    repeats: int = 1
    seed: int = 0
PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"


def parse_overrides(text: str | dict | None) -> dict:
    """'a=1 b=[1,2] c=x' (YAML values) or a dict -> dict."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    result = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override: expected key=value, found {item!r}")
        result[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return result


def _split_top_level(text: str) -> list[str]:
    """Split on whitespace outside brackets, so 'grid=[1, 2] n=3' stays two items."""
    items, depth, current = [], 0, ""
    for ch in text.strip():
        depth += ch in "[{(" and 1 or 0
        depth -= ch in "]})" and 1 or 0
        if ch.isspace() and depth == 0:
            if current:
                items.append(current)
            current = ""
        else:
            current += ch
    if current:
        items.append(current)
    return items


def read_params_file(target: str, params_dir: Path | None = None) -> dict:
    """The raw YAML of a target, checked for its top-level shape."""
    path = Path(params_dir or PARAMS_DIR) / f"{target}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(params_dir or PARAMS_DIR).glob("*.yaml"))
        raise ParamsError(f"params for {target!r}: expected {path}, found none (known targets: {known})")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"experiment", "description", "base", "profiles"}
    if unknown or "experiment" not in raw or "profiles" not in raw:
        raise ParamsError(f"{path}: expected keys experiment, profiles (and base, description), found {sorted(raw)}")
    return raw


def resolve(target: str, profile: str = "smoke", overrides=None, params_dir: Path | None = None) -> dict:
    """Merged plain dict for a target and profile, with 'target' and 'profile' recorded in it."""
    raw = read_params_file(target, params_dir)
    if profile not in PROFILES or profile not in raw["profiles"]:
        raise ParamsError(f"profile: expected one of {sorted(raw['profiles'])}, found {profile!r}")
    overrides = parse_overrides(overrides)
    fixed = sorted({"target", "profile"} & set(overrides))
    if fixed:
        found = ", ".join(f"{k}={overrides[k]!r}" for k in fixed)
        raise ParamsError(f"override: {', '.join(fixed)} cannot be set (found {found}); choose the target and "
                          f"--profile on the command line")
    merged = {**(raw.get("base") or {}), **(raw["profiles"][profile] or {}), **overrides}
    return {**merged, "target": target, "profile": profile}


def build(cls, values: dict):
    """Validate a dict into the frozen dataclass `cls`: unknown or missing keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{cls.__name__}: missing key {name!r}")
            continue
        kwargs[name] = _coerce(values[name], hints[name], f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _coerce(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else typing.Any
        return tuple(_coerce(v, item, f"{where}[]") for v in value)
    if annotation is typing.Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ParamsError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, found {value!r}")


def load_params(target: str, profile: str = "smoke", overrides=None, params_dir: Path | None = None):
    """Resolve a target's params and validate them into its experiment's `Params` dataclass."""
    from ember.experiments import experiment_module

    values = resolve(target, profile, overrides, params_dir)
    raw = read_params_file(target, params_dir)
    return build(experiment_module(raw["experiment"]).Params, values)
