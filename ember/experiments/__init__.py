"""One module per figure/table; each has a frozen `Params` dataclass and `run(params) -> DataFrame`."""

from __future__ import annotations

import importlib

from ember.errors import ParamsError

EXPERIMENTS = {
    "prefill_share": "ember.experiments.prefill_share",
    "budget_curves": "ember.experiments.budget_curves",
    "cross_framework": "ember.experiments.cross_framework",
    "cumulative_cost": "ember.experiments.cumulative_cost",
    "equal_bytes": "ember.experiments.equal_bytes",
    "prefix_savings": "ember.experiments.prefix_savings",
    "regime_map": "ember.experiments.regime_map",
    "stale_kv": "ember.experiments.stale_kv",
    "strategies": "ember.experiments.strategies",
    "update_locality": "ember.experiments.update_locality",
}


def experiment_module(name: str):
    """The module implementing an experiment, by its name in a params file."""
    if name not in EXPERIMENTS:
        raise ParamsError(f"experiment: expected one of {sorted(EXPERIMENTS)}, found {name!r}")
    return importlib.import_module(EXPERIMENTS[name])
