"""Plots of training runs' per-prompt stats logs, behind ``scripts/plot_stats.py``.

``load_run`` reads a run directory written by ``training.train``;
``choose_prompts`` picks which prompts to draw; ``plot_prompt_stats`` draws the
overall reward curve on top and, below it, one small panel per prompt with
the tracker's mean (a line), plus and minus one std (a band) and the prompt's
batch reward (dots), for one or several overlaid runs.

Dimensions: E recorded epochs, M recorded prompts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence

import matplotlib
import matplotlib.ticker
import numpy as np

from rail_interview.stat_tracking import PromptStatsLog, load_prompt_stats

#: Reward values labelled on the symlog axes.
REWARD_TICKS = (0, -1, -3, -10, -30, -100, -300, -1000)


@dataclasses.dataclass
class RunLog:
    """What one run directory holds, loaded.

    Attributes:
        run_dir: the directory.
        label: a short name for legends, such as "buffer, seed 0".
        stats: the per-prompt stats log.
        epoch: int [E_all], every epoch of metrics.csv.
        reward_mean: float [E_all], each epoch's batch-mean reward.
    """

    run_dir: str
    label: str
    stats: PromptStatsLog
    epoch: np.ndarray
    reward_mean: np.ndarray


def load_run(run_dir: str) -> RunLog:
    """Loads a run directory's stats log and metrics.

    Args:
        run_dir: a directory written by ``training.train``.

    Returns:
        The run.

    Raises:
        FileNotFoundError: if it is not a run directory or holds no stats log
            (for example a run made with ``stats_log.every=0``).
    """
    if not os.path.isfile(os.path.join(run_dir, "metrics.csv")):
        raise FileNotFoundError(f"{run_dir!r} is not a run directory (no metrics.csv); pass the directory "
                                "that train.py printed, such as logs/20261124-004036_buffer_seed0")
    stats = load_prompt_stats(os.path.join(run_dir, "stats"))
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    label = os.path.basename(os.path.normpath(run_dir))
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        label = f"{config['stat_tracking']['method']}, seed {config['seed']}"
    return RunLog(
        run_dir=run_dir,
        label=label,
        stats=stats,
        epoch=np.array([int(r["epoch"]) for r in rows]),
        reward_mean=np.array([float(r["reward_mean"]) for r in rows]),
    )


def choose_prompts(
    log: PromptStatsLog, prompts: Sequence[str] = (), *, max_prompts: int = 64, seed: int = 0
) -> List[int]:
    """Picks the columns (recorded prompts) of a log to draw.

    Args:
        log: the stats log.
        prompts: prompt names or ids to draw, in this order; empty for all
            recorded prompts, or a random sample of ``max_prompts`` of them.
        max_prompts: the most panels when ``prompts`` is empty.
        seed: seed of that random sample.

    Returns:
        Column indexes into the log's [E, M] arrays, ascending by prompt id
        for a sample.

    Raises:
        KeyError: if a requested prompt was not recorded.
    """
    column_of = {name: i for i, name in enumerate(log.prompt_names)}
    column_of.update({str(int(pid)): i for i, pid in enumerate(log.prompt_ids)})
    if prompts:
        missing = [p for p in prompts if p not in column_of]
        if missing:
            raise KeyError(f"prompts not in the stats log: {missing}; recorded: {log.prompt_names[:8]}...")
        return [column_of[p] for p in prompts]
    columns = list(range(len(log.prompt_ids)))
    if len(columns) > max_prompts:
        columns = sorted(random.Random(seed).sample(columns, max_prompts))
    return columns


def label_symlog_rewards(ax, ticks: Sequence[float]) -> None:
    """Puts a reward axis on a symlog scale, labelled at the ``ticks`` within its limits.

    Rewards here span -1000 to -1; a symlog axis (linear within +-1) keeps
    convergence near 0 visible next to starts near -200.

    Args:
        ax: a matplotlib Axes, its y limits already set or autoscaled.
        ticks: candidate tick values; those inside the limits are labelled,
            and minor ticks are removed.
    """
    ax.set_yscale("symlog", linthresh=1)
    low, high = ax.get_ylim()
    chosen = [t for t in ticks if low <= t <= high]
    ax.set_yticks(chosen, [f"{t:g}" for t in chosen])
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _symlog_axis(ax, low: float) -> None:
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(low, 0.5)
    label_symlog_rewards(ax, REWARD_TICKS)


def plot_prompt_stats(runs: Sequence[RunLog], columns: Sequence[int], path: str) -> None:
    """Draws the reward curve and a grid of per-prompt panels, and saves a PNG.

    Each prompt's panel shares both axes with the others (a symlog reward
    axis, so convergence near 0 stays visible next to starts near -200).
    Epochs where the first run's prompt still used batch statistics are
    shaded grey.

    Args:
        runs: one or more runs; their prompts are matched by the first run's
            recorded prompt ids.
        columns: columns of the first run's log to draw (``choose_prompts``).
        path: the PNG file to write.

    Raises:
        ValueError: if a run did not record one of the chosen prompts.
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    first = runs[0].stats
    prompt_ids = [int(first.prompt_ids[c]) for c in columns]
    per_run_columns: List[Dict[int, int]] = []
    for run in runs:
        where = {int(pid): i for i, pid in enumerate(run.stats.prompt_ids)}
        missing = [p for p in prompt_ids if p not in where]
        if missing:
            raise ValueError(f"run {run.run_dir!r} did not record prompt ids {missing[:5]}")
        per_run_columns.append(where)

    finite = [run.stats.mean[:, [per_run_columns[r][p] for p in prompt_ids]] for r, run in enumerate(runs)]
    lowest = min([np.nanmin(np.concatenate([f.ravel(), run.reward_mean]))
                  for f, run in zip(finite, runs)] + [-3.0])
    low = -(10 ** math.ceil(math.log10(-lowest * 1.2)))

    num_cols = math.ceil(math.sqrt(len(prompt_ids)))
    num_rows = math.ceil(len(prompt_ids) / num_cols)
    fig = plt.figure(figsize=(max(2.3 * num_cols, 9.0), 2.0 * num_rows + 3.0), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.0, 2.0 * num_rows])
    colors = [f"C{i}" for i in range(len(runs))]

    ax = top.subplots()
    for run, color in zip(runs, colors):
        ax.plot(run.epoch, run.reward_mean, color=color, lw=1.2, label=run.label)
    _symlog_axis(ax, low)
    ax.set_xlabel("epoch")
    ax.set_ylabel("batch reward")
    ax.set_title("All prompts: batch-mean reward")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")

    axes = bottom.subplots(num_rows, num_cols, sharex=True, sharey=True, squeeze=False)
    for panel, (ax, prompt) in enumerate(zip(axes.flat, prompt_ids)):
        for r, (run, color) in enumerate(zip(runs, colors)):
            log, column = run.stats, per_run_columns[r][prompt]
            mean, std = log.mean[:, column], log.std[:, column]
            if r == 0:
                ax.fill_between(log.step, low, 0.5, where=log.fallback[:, column], color="0.88", lw=0, step="mid")
            ax.plot(log.step, log.batch_reward_mean[:, column], ".", color=color, ms=1.5, alpha=0.35)
            ax.fill_between(log.step, mean - std, mean + std, color=color, alpha=0.25, lw=0)
            ax.plot(log.step, mean, color=color, lw=1.0)
        ax.set_title(f"{first.prompt_names[columns[panel]]} ({prompt})", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    _symlog_axis(axes[0][0], low)
    for ax in axes.flat[len(prompt_ids):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("reward", fontsize=8)
    bottom.suptitle("Per prompt: tracked mean (line) +- std (band), batch rewards (dots); "
                    "grey: still on batch statistics", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
