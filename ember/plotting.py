"""Plot helpers shared by the figure notebooks (seaborn styling, matplotlib drawing)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import MaxNLocator


def stacked_shares(summary, stages, x: str, facet: str, title: str, xlabel: str, facet_label: str):
    """One panel per `facet` value; at each `x`, a bar stacking `<stage>_share` (%) for the stages."""
    sns.set_theme(style="whitegrid", context="paper")
    facets = sorted(summary[facet].unique())
    fig, axes = plt.subplots(1, len(facets), figsize=(3.2 * len(facets), 3.0), sharey=True, squeeze=False)
    colors = sns.color_palette("deep", len(stages))
    for ax, value in zip(axes[0], facets):
        part = summary[summary[facet] == value].sort_values(x)
        labels = [str(v) for v in part[x]]
        bottom = [0.0] * len(part)
        for stage, color in zip(stages, colors):
            heights = part[f"{stage}_share"].tolist()
            ax.bar(labels, heights, bottom=bottom, color=color, label=stage, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{facet_label} {value}")
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("share of rollout time (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(stages), bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.suptitle(title, y=1.15)
    fig.tight_layout()
    return fig


def measured_vs_bound(summary, x: str, y: str, bound: str, hue: str, title: str, xlabel: str, ylabel: str,
                      hue_label: str):
    """Measured `y` against `x`, one line per `hue` value, each with its bound as a dashed line."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    values = sorted(summary[hue].unique())
    colors = sns.color_palette("deep", len(values))
    for value, color in zip(values, colors):
        part = summary[summary[hue] == value].sort_values(x)
        ax.plot(part[x], part[y], marker="o", color=color, label=f"{hue_label} {value}: measured")
        ax.plot(part[x], part[bound], linestyle="--", color=color, alpha=0.7, label=f"{hue_label} {value}: bound")
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def locality_tradeoff(summary, recommended: dict, title: str):
    """fig4: work and time saved by UpdateLocality(N) vs Naive and vs PrefixOnly (left), and the rollout reward
    and held-out accuracy change vs training every layer (right), against the frozen depth; the recommended
    range shaded and the failure boundary marked."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    ul = summary[summary["policy"] == "UpdateLocality"].sort_values("frozen_pct")
    for suffix, style, against in (("", "-", "Naive"), ("_vs_prefix_only", "--", "PrefixOnly")):
        if ul.get(f"tokens_layers_saved_pct{suffix}") is None or ul[f"tokens_layers_saved_pct{suffix}"].isna().all():
            continue
        left.plot(ul["frozen_pct"], ul[f"tokens_layers_saved_pct{suffix}"], style, marker="o", color="C0",
                  label=f"tokens x layers saved vs {against}")
        left.plot(ul["frozen_pct"], ul[f"prefill_saved_pct{suffix}"], style, marker="s", color="C1",
                  label=f"prefill time saved vs {against}")
    left.axhline(0, color="0.6", linewidth=0.8)
    left.set_xlabel("frozen depth N (% of layers)")
    left.set_ylabel("saved (%)")
    left.legend(fontsize=6, frameon=False)
    right.plot(ul["frozen_pct"], ul["reward_change"], marker="o", color="C2", label="rollout reward change")
    right.plot(ul["frozen_pct"], ul["accuracy_change"], marker="^", linestyle=":", color="C4",
               label="held-out accuracy change")
    right.axhline(0, color="0.6", linewidth=0.8)
    right.set_xlabel("frozen depth N (% of layers)")
    right.set_ylabel("change vs training all layers")
    right.legend(fontsize=6, frameon=False)
    low, high = recommended.get("recommended_low_pct"), recommended.get("recommended_high_pct")
    for ax in (left, right):
        if low is not None:
            ax.axvspan(low, high, color="C2", alpha=0.08)
        if recommended.get("failure_pct") is not None:
            ax.axvline(recommended["failure_pct"], color="firebrick", linestyle="--", linewidth=1)
    right.set_title("shaded: recommended N; dashed: failure boundary", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def stale_errors(summary, per_layer, title: str):
    """fig5: last-layer key error against updates since the last refresh, one line per replay (left, log scale),
    and the per-layer key and value error of the replays in `per_layer` at their stalest update (right)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.8, 3.4))
    labels = sorted(summary["label"].unique())
    colors = dict(zip(labels, sns.color_palette("deep", len(labels))))
    for name in labels:
        part = summary[(summary["label"] == name) & (summary["since_refresh"] > 0)]
        curve = part.groupby("since_refresh")["k_err_last"].mean()
        if len(curve):
            left.plot(curve.index, curve.values, marker="o", markersize=3, color=colors[name], label=name)
    left.set_yscale("log")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("updates since the last refresh")
    left.set_ylabel("relative L2 error of K, last layer")
    left.legend(fontsize=6, frameon=False)
    for name, part in per_layer.groupby("label"):
        right.plot(part["layer"], part["k_rel_l2"], color=colors.get(name), label=f"{name} K")
        right.plot(part["layer"], part["v_rel_l2"], color=colors.get(name), linestyle="--", label=f"{name} V")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("layer")
    right.set_ylabel("relative L2 error, most updates since refresh")
    right.legend(fontsize=6, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cumulative_cost(df, summary, title: str):
    """fig3: per policy, the cumulative rollout seconds over the rounds (left, with the total saved vs Naive in
    the legend), the seconds of each round (middle) and the rollout reward of each round (right)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (cum, per_round, reward) = plt.subplots(1, 3, figsize=(11.0, 3.3))
    policies = list(summary["policy"])
    colors = dict(zip(policies, sns.color_palette("deep", len(policies))))
    saved = dict(zip(summary["policy"], summary.get("rollout_saved_pct_vs_naive", [None] * len(summary))))
    for policy in policies:
        part = df[df["policy"] == policy].sort_values("round")
        label = policy
        if saved.get(policy) is not None and policy != "Naive":
            label = f"{policy} ({-saved[policy]:+.0f}% rollout time vs Naive)"
        cum.plot(part["round"], part["cum_rollout_s"], marker="o", markersize=3, color=colors[policy], label=label)
        per_round.plot(part["round"], part["rollout_s"], marker="o", markersize=3, color=colors[policy])
        reward.plot(part["round"], part["reward"], marker="o", markersize=3, color=colors[policy])
    cum.set_ylabel("cumulative rollout time (s)")
    per_round.set_ylabel("rollout time per round (s)")
    reward.set_ylabel("mean rollout reward")
    for ax in (cum, per_round, reward):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    per_round.set_ylim(bottom=0)
    fig.legend(*cum.get_legend_handles_labels(), loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.98),
               frameon=False, fontsize=7)
    fig.suptitle(title, y=1.17)
    fig.tight_layout()
    return fig


def budget_curves(summary, title: str):
    """fig7: accuracy (%, 95% intervals) against the mean bytes actually sent (log axis), one line per method
    over its caps (full transfer the rightmost point); cache methods solid, text dashed; the receiver alone
    and the receiver reading the context as horizontal references. Points that sent nothing are left off
    (they are the receiver alone)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    capped = summary[~summary["method"].isin(("alone", "context"))]
    methods = list(dict.fromkeys(capped["method"]))
    colors = dict(zip(methods, sns.color_palette("deep", len(methods))))
    for method in methods:
        part = capped[(capped["method"] == method) & (capped["bytes_mean"] > 0)].sort_values("bytes_mean")
        if part.empty:
            continue
        y = 100 * part["accuracy"]
        err = [100 * (part["accuracy"] - part["ci_low"]), 100 * (part["ci_high"] - part["accuracy"])]
        style = "--" if method.startswith("text") else "-"
        ax.errorbar(part["bytes_mean"], y, yerr=err, linestyle=style, marker="o", markersize=3, capsize=2,
                    color=colors[method], label=method)
    for method, style in (("alone", ":"), ("context", "-.")):
        part = summary[summary["method"] == method]
        if not part.empty:
            label = "receiver alone" if method == "alone" else "receiver reads the context"
            ax.axhline(100 * part["accuracy"].iloc[0], color="0.4", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per sample (measured, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _bytes_label(cap) -> str:
    """A cap as a short label: 'full', '512 B', '64 KiB', '2 MiB'."""
    if cap is None or cap != cap:  # None or NaN: full transfer
        return "full"
    cap = int(cap)
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if cap >= size and cap % size == 0:
            return f"{cap // size} {unit}"
    return f"{cap} B"


def regime_map(table, why, title: str):
    """fig8: left, the regime map: one row per (pair, task, context bucket), one column per cap, colored by
    the best cache method's accuracy minus the best text baseline's (points; blue: cache ahead, red: text
    ahead), a star where the 95% interval excludes zero. Right, why, for the first row: what the cache's bytes
    are made of (share per section) with the fraction of context tokens kept, and the end-to-end latency of
    cache and text per cap."""
    import numpy as np

    sns.set_theme(style="white", context="paper")
    main = table[table["shard"] == 0].copy()
    main["row"] = main.apply(lambda r: f"{r['pair']} / {r['task']} / {int(r['context_len_bucket'])} tok", axis=1)
    main["cap_order"] = main["cap"].fillna(float("inf"))
    rows = list(dict.fromkeys(main["row"]))
    caps = sorted(main["cap_order"].unique())
    grid = np.full((len(rows), len(caps)), np.nan)
    stars = np.zeros_like(grid, dtype=bool)
    for r in main.itertuples():
        i, j = rows.index(r.row), caps.index(r.cap_order)
        grid[i, j], stars[i, j] = r.diff_points, r.winner != "tie"
    fig = plt.figure(figsize=(13, 1.6 + 0.45 * max(len(rows), 4)))
    spec = fig.add_gridspec(1, 3, width_ratios=[2.2, 1.2, 1.2], wspace=0.7)
    ax = fig.add_subplot(spec[0])
    image = ax.imshow(grid, cmap="RdBu", vmin=-100, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(caps)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.0f}{'*' if stars[i, j] else ''}", ha="center", va="center",
                        fontsize=7, color="white" if abs(grid[i, j]) > 60 else "black")
    ax.set_xticks(range(len(caps)), [_bytes_label(None if c == float("inf") else c) for c in caps],
                  rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("per-sample byte cap")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="cache - text accuracy (points)")
    ax.set_title("cache - text (*: a winner: interval excludes 0 and exact p < 0.05)", fontsize=9)

    lead = why.iloc[0]
    first = why[(why["pair"] == lead["pair"]) & (why["task"] == lead["task"])
                & (why["context_len_bucket"] == lead["context_len_bucket"])].copy()
    first["cap_order"] = first["cap"].fillna(float("inf"))
    first = first.sort_values("cap_order")
    labels = [_bytes_label(None if c == float("inf") else c) for c in first["cap_order"]]
    sections = ("header", "indices", "map", "payload", "scales", "checksum")
    totals = sum(first[f"bytes_{s}"] for s in sections).replace(0, np.nan)
    ax_bytes = fig.add_subplot(spec[1])
    bottom = np.zeros(len(first))
    for section, color in zip(sections, sns.color_palette("deep", len(sections))):
        share = (100 * first[f"bytes_{section}"] / totals).fillna(0).to_numpy()
        ax_bytes.bar(labels, share, bottom=bottom, color=color, label=section, width=0.7)
        bottom += share
    ax_bytes.plot(labels, 100 * first["tokens_kept"], color="black", marker="o", markersize=3,
                  label="tokens kept")
    ax_bytes.set_ylim(0, 105)
    ax_bytes.set_ylabel("% of the cache's bytes; tokens kept")
    ax_bytes.tick_params(axis="x", rotation=45)
    ax_bytes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    ax_bytes.set_title(f"why: {lead['pair']} / {lead['task']} / {int(lead['context_len_bucket'])} tok", fontsize=9)
    ax_time = fig.add_subplot(spec[2])
    ax_time.plot(labels, first["cache_e2e_ms"], marker="o", markersize=3, label="best cache (end to end)")
    ax_time.plot(labels, first["text_e2e_ms"], marker="s", markersize=3, linestyle="--",
                 label="best text (incl. hint writing)")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("latency per sample (ms, log)")
    ax_time.tick_params(axis="x", rotation=45)
    ax_time.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    ax_time.set_title("latency", fontsize=9)
    fig.suptitle(title, y=1.02)
    return fig


def equal_bytes(table, title: str):
    """tab3 at a glance: one panel per (pair, task, context bucket), accuracy (with 95% intervals) against the
    per-sample cap for ember's best cache method, the best text baseline and the two layer-wise baselines."""
    import numpy as np

    sns.set_theme(style="whitegrid", context="paper")
    sides = (("cache", "ember cache (best)", "o"), ("text", "text (best)", "s"), ("kvcomm", "KVComm-like", "^"),
             ("qkvcomm", "Q-KVComm-like", "D"))
    panels = list(table.groupby(["pair", "task", "context_len_bucket"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, ((pair, task, bucket), part) in zip(axes[0], panels):
        part = part.assign(order=part["cap"].fillna(float("inf"))).sort_values("order")
        x = np.arange(len(part))
        for (side, label, marker), color in zip(sides, sns.color_palette("deep", len(sides))):
            if f"{side}_accuracy" not in part:
                continue
            acc = 100 * part[f"{side}_accuracy"].to_numpy(float)
            err = np.vstack([acc - 100 * part[f"{side}_ci_low"].to_numpy(float),
                             100 * part[f"{side}_ci_high"].to_numpy(float) - acc]).clip(min=0)  # rounding
            ax.errorbar(x, acc, yerr=err, marker=marker, markersize=4, capsize=2, color=color, label=label)
        ax.set_xticks(x, [_bytes_label(None if c == float("inf") else c) for c in part["order"]], rotation=45,
                      ha="right")
        ax.set_ylim(-5, 105)
        ax.set_xlabel("per-sample byte cap")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{pair} / {task} / {int(bucket)} tok", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(title, y=1.03)
    return fig


def cross_framework_bars(summary, title: str):
    """tab2 at a glance: one panel per workload, tokens/s per measured framework (from zero, value on each bar);
    frameworks that did not run are named under the panel."""
    sns.set_theme(style="whitegrid", context="paper")
    workloads = list(dict.fromkeys(summary["workload"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.6 * len(workloads) + 2.2, 3.2), squeeze=False,
                             sharey=True)  # one framework order, labelled once on the left
    frameworks = list(dict.fromkeys(summary["label"]))
    colors = dict(zip(frameworks, sns.color_palette("deep", len(frameworks))))
    for ax, workload in zip(axes[0], workloads):
        part = summary[summary["workload"] == workload]
        measured = part[part["status"] == "measured"]
        ax.barh(measured["label"], measured["tokens_per_s"], color=[colors[f] for f in measured["label"]])
        for y, value in enumerate(measured["tokens_per_s"]):
            ax.text(value, y, f" {value:,.0f}" if value >= 10 else f" {value:.2g}", va="center", fontsize=7)
        if len(measured):
            ax.set_xlim(0, 1.25 * measured["tokens_per_s"].max())
        ax.set_xlabel("generated tokens/s")
        ax.set_title(workload)
        skipped = part[part["status"] != "measured"]["label"].tolist()
        if skipped:
            ax.annotate("not run here: " + ", ".join(skipped), (0, -0.32), xycoords="axes fraction", fontsize=7)
    axes[0][0].invert_yaxis()  # shared: inverted once, the first framework on top
    fig.suptitle(title)
    fig.tight_layout()
    return fig
