"""Run parameters: `params/<target>.yaml` profiles merged with overrides, validated into frozen dataclasses.

A params file has `experiment` (a module in ember.experiments), optional `base` values and `profiles`
(smoke / default / paper). Values resolve as base <- profile <- overrides; unknown keys, wrong types and values
out of range are errors that name the key, what was expected and what was found.

A `Params` field declares its range with `param(default, low=..., high=..., choices=...)`; checks that involve
several fields go in the dataclass's `validate()` (call `super().validate()`). `build` runs both.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from ember.errors import ParamsError

PROFILES = ("smoke", "default", "paper")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device, where: str = "device") -> None:
    """Raise ParamsError unless `device` is spelled auto, cpu, cuda or cuda:N (availability is checked where it
    runs: `ember.experiments.workloads.resolve_device`)."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ParamsError(f"{where}: expected auto, cpu, cuda or cuda:N, found {device!r}")


def param(default, *, low=None, high=None, choices=None):
    """A Params field with a declared range: numbers (each item of a tuple) within [low, high], or one of
    `choices`. A tuple field with a range is a grid axis and must hold at least one value."""
    return dataclasses.field(default=default, metadata={"range": {"low": low, "high": high, "choices": choices}})


@dataclasses.dataclass(frozen=True)
class RunParams:
    """Fields every experiment shares; each experiment's `Params` extends it with its grid and workload."""

    target: str = ""
    profile: str = "smoke"
    model: str = "tiny-qwen3"
    dtype: str = param("float32", choices=("float32", "bfloat16", "float16"))
    device: str = "auto"
    warmup: int = param(1, low=0)
    repeats: int = param(1, low=1)
    seed: int = param(0, low=0)

    def validate(self) -> None:
        """Checks beyond one field's range (subclasses extend it and call `super().validate()`); raises ParamsError."""
        check_device_name(self.device, f"{type(self).__name__}.device")


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
        _check_range(kwargs[name], f.metadata.get("range"), f"{cls.__name__}.{name}")
    params = cls(**kwargs)
    if hasattr(params, "validate"):
        params.validate()
    return params


def _check_range(value, spec: dict | None, where: str) -> None:
    """Raise ParamsError when `value` (or an item of a tuple `value`) is outside a `param(...)` range."""
    if spec is None or value is None:
        return
    if isinstance(value, tuple) and not value:
        raise ParamsError(f"{where}: expected at least one value, found []")
    low, high, choices = spec["low"], spec["high"], spec["choices"]
    for item in value if isinstance(value, tuple) else (value,):
        if choices is not None and item not in choices:
            raise ParamsError(f"{where}: expected one of {list(choices)}, found {item!r}")
        if low is not None and item < low:
            raise ParamsError(f"{where}: expected a value >= {low}, found {item!r}")
        if high is not None and item > high:
            raise ParamsError(f"{where}: expected a value <= {high}, found {item!r}")


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
