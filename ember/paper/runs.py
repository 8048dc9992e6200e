"""The paper's figure catalog and the macro names the experiments write.

Macro names carry the grid of a run (fig2's context lengths, fig5's ranks, fig7's pair), so the names the
paper may quote are found by running each experiment's macro writer, exactly as its notebook calls it before
`publish`, on the runs committed in docs/runs/ (results.csv + manifest.json): real inputs, seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ember.errors import ReportError
from ember.report import REPO_ROOT

RUNS_DIR = REPO_ROOT / "docs" / "runs"


@dataclass(frozen=True)
class Target:
    """A figure or table the paper shows (`built`: whether the project has its experiment yet)."""

    name: str
    built: bool = True

    @property
    def command(self) -> str:
        """The command that regenerates it at the paper's profile."""
        return f"make {self.name} PROFILE=paper"


# fig2 rollout time decomposition, fig3 cumulative cost, fig4 update locality, fig5 stale K/V, fig6 prefix
# savings, fig7 budget curves, fig8 regime map, tab1 strategies, tab2 cross-framework throughput, tab3
# head-to-head at equal bytes
CATALOG = {t.name: t for t in (Target("fig2"), Target("fig3"), Target("fig4"), Target("fig5"), Target("fig6"),
                               Target("fig7"), Target("fig8"), Target("tab1"), Target("tab2"),
                               Target("tab3"))}


def target_of(name: str) -> str:
    """The target that writes a generated file or figure: `tab1_policies` -> `tab1`."""
    target = name.split("_", 1)[0]
    if target not in CATALOG:
        raise ReportError(f"paper: expected a file of one of the targets {sorted(CATALOG)}, found {name!r}")
    return target


def _fig2(df, params):
    from ember.experiments import prefill_share

    return prefill_share.macros(prefill_share.summarize(df))


def _fig3(df, params):
    from ember.experiments import cumulative_cost

    return cumulative_cost.macros(cumulative_cost.summarize(df))


def _fig4(df, params):
    from ember.experiments import update_locality

    return update_locality.macros(update_locality.summarize(df), params.accuracy_tolerance)


def _fig5(df, params):
    from ember.experiments import stale_kv

    return stale_kv.macros(stale_kv.summarize(df))


def _fig6(df, params):
    from ember.experiments import prefix_savings

    return prefix_savings.macros(prefix_savings.summarize(df))


def _fig7(df, params):
    from ember.experiments import budget_curves

    return budget_curves.macros(budget_curves.summarize(df), params)


def _fig8(df, params):
    from ember.experiments import regime_map

    table = regime_map.regime_table(df, params)
    return regime_map.macros(table, regime_map.flips(table, df, params), params)


def _tab1(df, params):
    from ember.experiments import strategies

    return strategies.macros(strategies.policy_table(df, params), strategies.ladder_table(df, params),
                             strategies.stack_table(df, params))


def _tab2(df, params):
    from ember.experiments import cross_framework

    return cross_framework.macros(cross_framework.summarize(df))


def _tab3(df, params):
    from ember.experiments import equal_bytes

    return equal_bytes.macros(equal_bytes.head_to_head(df), params)


# target -> (df, params) -> macros: what notebooks/<target>_*.ipynb passes to publish(macros=...)
MACRO_WRITERS = {"fig2": _fig2, "fig3": _fig3, "fig4": _fig4, "fig5": _fig5, "fig6": _fig6, "fig7": _fig7,
                 "fig8": _fig8, "tab1": _tab1, "tab2": _tab2, "tab3": _tab3}


def run_params(manifest: dict):
    """The params of a stored run as the current code's dataclass. Keys the code no longer has (a renamed or
    removed parameter) are left out: they cannot change which macro names are written."""
    from ember.experiments import experiment_module
    from ember.params import build, read_params_file

    cls = experiment_module(read_params_file(manifest["target"])["experiment"]).Params
    fields = {f.name for f in dataclasses.fields(cls)}
    return build(cls, {k: v for k, v in manifest["params"].items() if k in fields})


def stored_runs(runs_dir: Path = RUNS_DIR) -> list[Path]:
    """The folders of docs/runs holding a finished figure run (results.csv + manifest.json)."""
    return sorted(p for p in runs_dir.iterdir() if (p / "manifest.json").is_file() and (p / "results.csv").is_file())


def run_macros(folder: Path) -> dict:
    """The macros the target's writer produces for the stored run in `folder`."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    target = manifest.get("target")
    if target not in MACRO_WRITERS:
        raise ReportError(f"{folder}: expected a run of one of {sorted(MACRO_WRITERS)}, found target {target!r}")
    return MACRO_WRITERS[target](pd.read_csv(Path(folder) / "results.csv"), run_params(manifest))


def known_macros(runs_dir: Path = RUNS_DIR) -> dict[str, list[str]]:
    """Every macro name some experiment writes for a committed run, with the runs that write it."""
    known: dict[str, list[str]] = {}
    for folder in stored_runs(runs_dir):
        for name in run_macros(folder):
            known.setdefault(name, []).append(folder.name)
    return known
