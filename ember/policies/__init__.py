"""Cache policies across LoRA updates (DESIGN.md section 7), the runner that applies them, and error probes."""

import re

from ember.policies.base import CORRECT, RECOMPUTE, REUSE, CachePolicy, Decision, PolicyError, Update
from ember.policies.keep_stale import KeepStale
from ember.policies.naive import Naive
from ember.policies.periodic_refresh import PeriodicRefresh
from ember.policies.prefix_only import PrefixOnly
from ember.policies.runner import PolicyRunner, PolicyStats
from ember.policies.updatable_kv import UpdatableKV
from ember.policies.update_locality import UpdateLocality

__all__ = ["CORRECT", "RECOMPUTE", "REUSE", "CachePolicy", "Decision", "PolicyError", "Update", "KeepStale", "Naive",
           "PeriodicRefresh", "PrefixOnly", "PolicyRunner", "PolicyStats", "UpdatableKV", "UpdateLocality",
           "make_policy"]


def make_policy(spec: str) -> CachePolicy:
    """A policy from its name in params: naive, prefix_only, keep_stale, update_locality:N, periodic_refresh:k,
    updatable_kv:k."""
    name, _, arg = spec.partition(":")
    makers = {"naive": Naive, "prefix_only": PrefixOnly, "keep_stale": KeepStale, "update_locality": UpdateLocality,
              "periodic_refresh": PeriodicRefresh, "updatable_kv": UpdatableKV}
    if name not in makers:
        raise PolicyError(f"policy: expected one of {sorted(makers)} (with ':<int>' where it takes one), found {spec!r}")
    takes_arg = name in ("update_locality", "periodic_refresh", "updatable_kv")
    if takes_arg != bool(arg) or (arg and not re.fullmatch(r"[0-9]+", arg)):
        raise PolicyError(f"policy {spec!r}: expected {name + ':<int>' if takes_arg else name}")
    return makers[name](int(arg)) if takes_arg else makers[name]()
