"""tab3: head to head at equal measured bytes. Per pair, task, context bucket and per-sample cap: ember's best
cache method, the best text baseline, the KVComm-like and the Q-KVComm-like baselines
(ember.comm.layer_baselines, each documenting how it differs from the published method), all through KVWire
at the same caps, on the same items.

The sweep is the regime map's (ember.experiments.regime_map: long-context items, cells stored and resumed
by the hash of their config and code, sequential sharer-then-receiver execution); this module adds the
baselines' presence check and the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ember.errors import ParamsError
from ember.experiments import regime_map
from ember.experiments.budget_curves import summarize
from ember.report import Fixed, macro_name

SIDES = ("cache", "text", "kvcomm", "qkvcomm")
SIDE_NAMES = {"cache": "ember cache", "text": "text", "kvcomm": "KVComm-like", "qkvcomm": "Q-KVComm-like"}


@dataclass(frozen=True)
class Params(regime_map.Params):
    """The regime map's params; the methods must include a kvcomm: and a qkvcomm: baseline."""

    def validate(self) -> None:
        super().validate()
        families = {regime_map.family(m) for m in self.methods}
        missing = [f"{side}:" for side in ("kvcomm", "qkvcomm") if side not in families]
        if missing:
            raise ParamsError(f"Params.methods: tab3 compares with the layer-wise baselines; expected a method of "
                              f"each of {missing}, found {list(self.methods)}")


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Every cell of the grid (stored cells reused): one row per (pair, task, bucket, method, cap, item)."""
    return regime_map.run(params, progress)


def head_to_head(df: pd.DataFrame) -> pd.DataFrame:
    """Per (pair, task, bucket, cap) of the main shard, for each side (ember's best kv:/rd: method, the best
    text baseline, the best KVComm-like and Q-KVComm-like method): the method, its accuracy with a 95% Wilson
    interval, its mean measured bytes and mean end-to-end latency; the side with the highest accuracy
    (ties to fewer bytes, then lower latency, then name) is the row's `leader`."""
    main = df[df["shard"] == 0]
    summary = summarize(main, by=("pair", "task", "context_len_bucket"))
    summary = summary[summary["cap"].notna() | summary["method"].map(regime_map.family).isin(SIDES)]
    rows = []
    for key, part in summary.groupby(["pair", "task", "context_len_bucket", "cap"], dropna=False, sort=True):
        family = part["method"].map(regime_map.family)
        row = dict(zip(("pair", "task", "context_len_bucket", "cap"), key))
        best = {}
        for side in SIDES:
            mine = part[family == side]
            if mine.empty:
                continue
            top, _ = regime_map.best_of(mine)
            best[side] = top
            row.update({f"{side}_method": top["method"], f"{side}_accuracy": top["accuracy"],
                        f"{side}_ci_low": top["ci_low"], f"{side}_ci_high": top["ci_high"],
                        f"{side}_bytes": top["bytes_mean"], f"{side}_e2e_ms": top["e2e_ms"]})
        if best:
            leader, _ = regime_map.best_of(pd.DataFrame(best.values()))
            row["leader"] = next(side for side, top in best.items() if top["method"] == leader["method"])
        rows.append(row)
    return pd.DataFrame(rows)


def latex_table(table: pd.DataFrame) -> str:
    """The head-to-head table as LaTeX: per row the cap and, per side, accuracy (%) and mean measured bytes."""
    out = pd.DataFrame({"pair": table["pair"], "task": table["task"],
                        "context": table["context_len_bucket"].astype(int),
                        "cap (B)": table["cap"].map(_cap_text)})
    for side in SIDES:
        if f"{side}_accuracy" in table:
            out[f"{SIDE_NAMES[side]} (\\%)"] = (100 * table[f"{side}_accuracy"]).round(0).map(_number)
            out[f"{SIDE_NAMES[side]} (B)"] = table[f"{side}_bytes"].map(_number)
    escaped = out.apply(lambda column: column.map(lambda v: str(v).replace("_", r"\_")))
    return escaped.to_latex(index=False)


def _cap_text(cap) -> str:
    return "full" if pd.isna(cap) else str(int(cap))


def _number(value) -> str:
    return "--" if pd.isna(value) else f"{value:.0f}"


def macros(table: pd.DataFrame, params: Params) -> dict:
    """Per (pair, task, bucket): at how many finite caps each side leads (full transfer, where every side
    sends everything, is left out), and at the largest finite cap each side's accuracy (points)."""
    target = params.target or "tab3"
    values = {}
    for key, part in table.groupby(["pair", "task", "context_len_bucket"], sort=False):
        base = (target, key[0], key[1], f"ctx{int(key[2])}")
        capped = part[part["cap"].notna()].sort_values("cap")
        for side in SIDES:
            values[macro_name(*base, side, "leads")] = int((capped["leader"] == side).sum())
            column = f"{side}_accuracy"
            if column in capped and not capped.empty and pd.notna(capped[column].iloc[-1]):
                values[macro_name(*base, side, "accuracy at top cap")] = Fixed(100 * capped[column].iloc[-1], 0)
    return values
