"""Plot helpers shared by the figure notebooks (seaborn styling, matplotlib drawing)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns


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
