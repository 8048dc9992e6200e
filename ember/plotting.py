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
