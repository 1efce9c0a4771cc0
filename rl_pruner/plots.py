"""Figures of a policy search, logged as run artifacts by :mod:`rl_pruner.tracking`.

Each function returns a new :class:`matplotlib.figure.Figure` drawn with the Agg
canvas. The figures are not registered with ``pyplot``, so no global state changes,
nothing needs closing, and a figure is freed once the caller drops it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

BAR_WIDTH = 0.4
INCHES_PER_LAYER = 0.3
MIN_WIDTH_INCHES = 6.0


def plot_keep_ratios(
    layer_names: Sequence[str],
    best_keep: Sequence[float],
    uniform_keep: Sequence[float],
    dropped_layers: Collection[str] = (),
) -> Figure:
    """Draw per-layer keep ratios (1 - pruning ratio) of the best and the uniform policy.

    Layers are bars in the order given, which should be network order. A layer in
    ``dropped_layers`` belongs to a residual block replaced by the identity, so its
    best-policy bar is drawn at 0 and its column is hatched.

    Raises ValueError when the three sequences differ in length.
    """
    n_layers = len(layer_names)
    if len(best_keep) != n_layers or len(uniform_keep) != n_layers:
        raise ValueError(
            f"plot_keep_ratios needs one keep ratio per layer: {n_layers} layer names, "
            f"{len(best_keep)} best-policy ratios, {len(uniform_keep)} uniform-policy ratios"
        )
    dropped = [name in dropped_layers for name in layer_names]
    best_heights = [0.0 if is_dropped else float(keep) for keep, is_dropped in zip(best_keep, dropped)]

    figure = _new_figure(width=max(MIN_WIDTH_INCHES, INCHES_PER_LAYER * n_layers), height=4.5)
    axes = figure.add_subplot()
    positions = np.arange(n_layers)
    axes.bar(positions - BAR_WIDTH / 2, uniform_keep, BAR_WIDTH, label="uniform policy", color="tab:gray")
    axes.bar(positions + BAR_WIDTH / 2, best_heights, BAR_WIDTH, label="best policy", color="tab:blue")

    for position, is_dropped in zip(positions, dropped):
        if is_dropped:
            axes.axvspan(position - 0.5, position + 0.5, facecolor="none", edgecolor="tab:red",
                         hatch="//", linewidth=0, alpha=0.5)
    handles, _ = axes.get_legend_handles_labels()
    if any(dropped):
        # The spans carry no label, so one proxy patch stands for all of them in the legend.
        handles.append(Patch(facecolor="none", edgecolor="tab:red", hatch="//", label="dropped block"))

    axes.set_xticks(positions, list(layer_names), rotation=90, fontsize="small")
    axes.set_xlim(-0.5, n_layers - 0.5)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("keep ratio (fraction of channels kept)")
    axes.set_title("Keep ratio per layer")
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def plot_reward_vs_macs(
    macs_ratios: Sequence[float],
    rewards: Sequence[float],
    episodes: Sequence[int],
    target: float,
    baselines: Mapping[str, tuple[float, float]] | None = None,
) -> Figure:
    """Scatter each episode's reward against its MACs ratio (pruned / dense MACs).

    Points are coloured by episode index. A vertical line marks the target MACs
    ratio, and each baseline, given as name -> (MACs ratio, reward), is a labelled
    marker.

    Raises ValueError when the three sequences differ in length.
    """
    if not len(macs_ratios) == len(rewards) == len(episodes):
        raise ValueError(
            f"plot_reward_vs_macs needs one value per episode: {len(macs_ratios)} MACs ratios, "
            f"{len(rewards)} rewards, {len(episodes)} episode indices"
        )

    figure = _new_figure(width=7.0, height=5.0)
    axes = figure.add_subplot()
    points = axes.scatter(macs_ratios, rewards, c=episodes, cmap="viridis", s=16, alpha=0.8)
    figure.colorbar(points, ax=axes, label="episode")
    axes.axvline(target, color="tab:red", linestyle="--", label=f"target MACs ratio {target:g}")

    for name, (macs_ratio, reward) in (baselines or {}).items():
        axes.plot([macs_ratio], [reward], marker="D", markersize=8, linestyle="none", label=name)
        axes.annotate(name, (macs_ratio, reward), textcoords="offset points", xytext=(6, 6), fontsize="small")

    axes.set_xlabel("MACs ratio (pruned / dense)")
    axes.set_ylabel("reward")
    axes.set_title("Reward against MACs ratio")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def plot_best_reward_curve(episodes: Sequence[int], best_rewards: Sequence[float]) -> Figure:
    """Draw the best reward reached up to each episode, as a step line.

    The line is the running maximum of ``best_rewards``, so per-episode rewards give
    the same curve as rewards that are already best so far. NaN rewards are skipped.

    Raises ValueError when the two sequences differ in length.
    """
    if len(episodes) != len(best_rewards):
        raise ValueError(
            f"plot_best_reward_curve needs one reward per episode: {len(episodes)} episode indices, "
            f"{len(best_rewards)} rewards"
        )
    running_best = np.fmax.accumulate(np.asarray(best_rewards, dtype=float)) if len(best_rewards) else []

    figure = _new_figure(width=7.0, height=4.0)
    axes = figure.add_subplot()
    axes.step(episodes, running_best, where="post", color="tab:blue")
    axes.set_xlabel("episode")
    axes.set_ylabel("best reward so far")
    axes.set_title("Best reward over the search")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_pareto_front(
    points: Sequence[tuple[float, float]], front: Sequence[int], labels: Sequence[str], ylabel: str
) -> Figure:
    """Draw accuracy against MACs ratio for every trial of a sweep, joining the Pareto front.

    :param points: (MACs ratio, accuracy) per trial.
    :param front: Indices of the non-dominated points, in increasing MACs ratio.
    :param labels: One label per point, written beside it.
    :param ylabel: What the accuracy axis shows, with its unit.
    """
    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    if points:
        xs, ys = zip(*points, strict=True)
        axes.scatter(xs, ys, color="tab:gray", label="trial", zorder=2)
        for (x, y), label in zip(points, labels, strict=True):
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="tab:red",
                  label="Pareto front", zorder=3)
    axes.set_xlabel("MACs ratio (pruned / dense)")
    axes.set_ylabel(ylabel)
    axes.set_title("Sweep: accuracy against MACs")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure
