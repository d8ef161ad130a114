"""Plots of training runs' per-prompt stats logs, behind ``scripts/plot_stats.py``.

``load_run`` reads a run directory written by ``training.train``, or a stats
log that ``PromptStatsRecorder`` wrote in any trainer; ``check_same_problem``
refuses to overlay runs of different problems; ``choose_prompts`` picks which
prompts to draw; ``plot_prompt_stats`` draws the overall reward curve on top
and, below it, one small panel per prompt with the tracker's mean (a line),
plus and minus one std (a band) and the prompt's batch reward (dots), for one
or several overlaid runs, matched by prompt name.

Dimensions: E recorded epochs, M recorded prompts.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib
import matplotlib.ticker
import numpy as np

from rail_interview.stat_tracking import PromptStatsLog, load_prompt_stats
from rail_interview.stat_tracking.recording import PROMPTS_FILE
from rail_interview.training import STATS_DIR

#: Reward values labelled on the symlog axes.
REWARD_TICKS = (0, -1, -3, -10, -30, -100, -300, -1000)

#: The file of per-epoch metrics in a run directory.
METRICS_FILE = "metrics.csv"

#: Fields of config.json that together with the device determine a run's problem instance.
PROBLEM_FIELDS = ("seed", "problem")


class RunMismatchError(ValueError):
    """Runs that cannot be drawn together: of different problems, or without a chosen prompt."""


@dataclasses.dataclass
class RunLog:
    """What one run directory, or one recorder's stats directory, holds, loaded.

    Attributes:
        run_dir: the directory as given: a run directory, or the directory of
            a ``PromptStatsRecorder``.
        label: a short name for legends, such as "buffer, seed 0".
        stats: the per-prompt stats log.
        epoch: int [E_all], every epoch of metrics.csv; None for a stats log
            without a metrics.csv (written by ``PromptStatsRecorder`` in
            another trainer).
        reward_mean: float [E_all], each epoch's batch-mean reward; None
            where ``epoch`` is.
        config: the run's config.json, or None where there is none.
    """

    run_dir: str
    label: str
    stats: PromptStatsLog
    epoch: Optional[np.ndarray]
    reward_mean: Optional[np.ndarray]
    config: Optional[Dict[str, Any]] = None


def _stats_log_missing(run_dir: str, config: Optional[Dict[str, Any]]) -> FileNotFoundError:
    """The error for a run directory (it holds metrics.csv) that holds no usable stats log."""
    stats_dir = os.path.join(run_dir, STATS_DIR)
    every = (config or {}).get("stats_log", {}).get("every")
    if os.path.isdir(stats_dir):
        reason = f"{stats_dir} holds no {PROMPTS_FILE}"
    elif every == 0:
        reason = f"no {stats_dir}: the run was made with stats_log.every=0; rerun with stats_log.every > 0"
    else:
        reason = f"no {stats_dir}"
    return FileNotFoundError(f"{run_dir!r} has no per-prompt stats log: {reason}")


def _run_of_stats_dir(path: str) -> Optional[str]:
    """The training run directory whose stats/ ``path`` is (existing or not), or None."""
    if os.path.basename(os.path.abspath(path)) != STATS_DIR:
        return None
    parent = os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(parent, METRICS_FILE)) and os.path.isfile(os.path.join(parent, "config.json")):
        return parent
    return None


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_run(run_dir: str) -> RunLog:
    """Loads a run's stats log, and its metrics and config where it has them.

    Accepts every log that ``PromptStatsRecorder`` writes: a run directory of
    ``training.train`` (metrics.csv, config.json and the stats log in
    ``stats/``), its ``stats/`` subdirectory (loaded as the whole run), or
    the directory a ``PromptStatsRecorder`` wrote in another trainer
    (prompts.json and chunks, no metrics.csv: ``epoch`` and ``reward_mean``
    are then None).

    Args:
        run_dir: one of those directories.

    Returns:
        The run.

    Raises:
        FileNotFoundError: if it is none of those, or if it is a run
            directory without a stats log (a run made with
            ``stats_log.every=0``); the message names what the directory
            does hold.
    """
    normalized = os.path.normpath(run_dir)
    run_of_stats = _run_of_stats_dir(normalized)
    if not os.path.isdir(run_dir):
        if run_of_stats is not None:  # the missing stats/ of a run directory: say what the run holds
            raise _stats_log_missing(run_of_stats, _read_json(os.path.join(run_of_stats, "config.json")))
        raise FileNotFoundError(f"{run_dir!r} is not a run directory or a stats log: it does not exist")
    if os.path.isfile(os.path.join(run_dir, PROMPTS_FILE)):
        stats_dir, base_dir = run_dir, run_of_stats  # a training run's stats/: load the whole run
    elif os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        stats_dir, base_dir = os.path.join(run_dir, STATS_DIR), run_dir
        if not os.path.isfile(os.path.join(stats_dir, PROMPTS_FILE)):
            raise _stats_log_missing(run_dir, _read_json(os.path.join(run_dir, "config.json")))
    else:
        raise FileNotFoundError(
            f"{run_dir!r} is not a run directory or a stats log: it holds neither {METRICS_FILE} nor {PROMPTS_FILE}; "
            "pass the directory that train.py printed, or the directory given to PromptStatsRecorder"
        )
    stats = load_prompt_stats(stats_dir)

    epoch = reward_mean = config = None
    if base_dir is None:
        name = os.path.basename(os.path.abspath(normalized))
        parent = os.path.basename(os.path.dirname(os.path.abspath(normalized)))
        label = f"{parent}/{name}" if name == STATS_DIR else name
    else:
        with open(os.path.join(base_dir, METRICS_FILE), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        epoch = np.array([int(r["epoch"]) for r in rows], dtype=np.int64)
        reward_mean = np.array([float(r["reward_mean"]) for r in rows], dtype=np.float64)
        label = os.path.basename(os.path.normpath(base_dir))
        config = _read_json(os.path.join(base_dir, "config.json"))
        if config is not None:
            label = f"{config['stat_tracking']['method']}, seed {config['seed']}"
    return RunLog(run_dir=run_dir, label=label, stats=stats, epoch=epoch, reward_mean=reward_mean, config=config)


def metrics_notes(runs: Sequence[RunLog]) -> List[str]:
    """One line per run drawn without its batch-mean reward curve (it has no metrics.csv).

    Args:
        runs: the loaded runs.

    Returns:
        The lines, empty when every run has its metrics.
    """
    return [
        f"note: {run.run_dir!r} has no {METRICS_FILE} (a stats log written by PromptStatsRecorder): "
        "its batch-mean reward curve is left out, its per-prompt panels are drawn"
        for run in runs
        if run.reward_mean is None
    ]


def _problem_differences(a: RunLog, b: RunLog) -> List[str]:
    """How two runs' problems differ, as short phrases; empty if nothing shows they do."""
    differences = []
    if a.config is not None and b.config is not None:
        for field in PROBLEM_FIELDS:
            left, right = a.config.get(field), b.config.get(field)
            if isinstance(left, dict) and isinstance(right, dict):
                differences += [
                    f"problem.{key} {left.get(key)} vs {right.get(key)}"
                    for key in sorted(set(left) | set(right))
                    if left.get(key) != right.get(key)
                ]
            elif left != right:
                differences.append(f"{field} {left} vs {right}")
    name_of = [dict(zip(run.stats.prompt_ids.tolist(), run.stats.prompt_names)) for run in (a, b)]
    id_of = [dict(zip(run.stats.prompt_names, run.stats.prompt_ids.tolist())) for run in (a, b)]
    renamed = [pid for pid in name_of[0] if pid in name_of[1] and name_of[0][pid] != name_of[1][pid]]
    if renamed:
        pid = renamed[0]
        differences.append(
            f"{len(renamed)} of {len(set(name_of[0]) & set(name_of[1]))} shared prompt ids name "
            f"other prompts, id {pid} is {name_of[0][pid]!r} in the first and {name_of[1][pid]!r} "
            "in the second"
        )
    moved = [name for name in id_of[0] if name in id_of[1] and id_of[0][name] != id_of[1][name]]
    if moved:
        name = moved[0]
        differences.append(
            f"{len(moved)} shared prompt names have other ids, {name!r} is id {id_of[0][name]} "
            f"in the first and {id_of[1][name]} in the second"
        )
    return differences


def check_same_problem(runs: Sequence[RunLog]) -> None:
    """Refuses to overlay runs of different problem instances.

    Prompts are matched across runs by name, so every name must mean one
    prompt: runs differ if their config.json disagree on the seed or the
    ``problem`` section (which draw the prompts, their slots and labels), if
    a prompt id carries different names, or a name different ids. Runs of
    one problem that record different subsets of its prompts are accepted.

    Args:
        runs: the loaded runs.

    Raises:
        RunMismatchError: naming the first two runs that differ, and how.
    """
    for a, b in itertools.combinations(runs, 2):
        differences = _problem_differences(a, b)
        if differences:
            raise RunMismatchError(
                f"runs {a.run_dir!r} and {b.run_dir!r} are of different problems ({'; '.join(differences)}): "
                "prompt names would not mean the same prompts; overlay only runs of one seed and problem config"
            )


def common_prompt_names(runs: Sequence[RunLog]) -> List[str]:
    """The prompt names every run recorded, in the first run's order.

    Args:
        runs: one or more loaded runs.

    Returns:
        The names.
    """
    shared = set(runs[0].stats.prompt_names).intersection(*(run.stats.prompt_names for run in runs[1:]))
    return [name for name in runs[0].stats.prompt_names if name in shared]


def choose_prompts(
    log: PromptStatsLog,
    prompts: Sequence[str] = (),
    *,
    max_prompts: int = 64,
    seed: int = 0,
    among: Optional[Sequence[str]] = None,
) -> List[int]:
    """Picks the columns (recorded prompts) of a log to draw.

    Args:
        log: the stats log (the first run's, when overlaying runs).
        prompts: prompt names or ids to draw, in this order; empty for all
            recorded prompts, or a random sample of ``max_prompts`` of them.
        max_prompts: the most panels when ``prompts`` is empty.
        seed: seed of that random sample.
        among: prompt names to choose from, such as those every overlaid run
            recorded (``common_prompt_names``); None for all of the log's.

    Returns:
        Column indexes into the log's [E, M] arrays, ascending by prompt id
        for a sample.

    Raises:
        KeyError: if a requested prompt was not recorded, or is not in
            ``among``, or there is no prompt to choose from.
    """
    column_of = {name: i for i, name in enumerate(log.prompt_names)}
    column_of.update({str(int(pid)): i for i, pid in enumerate(log.prompt_ids)})
    allowed = set(log.prompt_names if among is None else among)
    if prompts:
        missing = [p for p in prompts if p not in column_of]
        if missing:
            raise KeyError(f"prompts not in the stats log: {missing}; recorded: {log.prompt_names[:8]}...")
        unshared = [p for p in prompts if log.prompt_names[column_of[p]] not in allowed]
        if unshared:
            raise KeyError(f"prompts not recorded by every run: {unshared}")
        return [column_of[p] for p in prompts]
    columns = [i for i, name in enumerate(log.prompt_names) if name in allowed]
    if not columns:
        raise KeyError(
            "no prompt to draw: "
            + ("the stats log records none" if among is None else "no prompt is recorded by every run")
        )
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


def _reward_axis(ax, limits: Tuple[float, float], symlog: bool) -> None:
    """Sets a reward axis's limits, on a labelled symlog scale or a linear one."""
    if symlog:
        ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(*limits)
    if symlog:
        label_symlog_rewards(ax, REWARD_TICKS)


def _matching_columns(runs: Sequence[RunLog], names: Sequence[str]) -> List[List[int]]:
    """Each run's log column of each named prompt: [run][panel].

    Raises:
        RunMismatchError: if a run did not record one of the prompts.
    """
    per_run_columns: List[List[int]] = []
    for run in runs:
        where = {name: i for i, name in enumerate(run.stats.prompt_names)}
        missing = [name for name in names if name not in where]
        if missing:
            raise RunMismatchError(f"run {run.run_dir!r} did not record prompts {missing[:5]}")
        per_run_columns.append([where[name] for name in names])
    return per_run_columns


def _reward_limits(
    runs: Sequence[RunLog], per_run_columns: List[List[int]], curves: List[np.ndarray]
) -> Tuple[Tuple[float, float], bool]:
    """The reward axis's limits over the drawn prompts' means and the reward curves, and whether it is symlog.

    Rewards that go negative get a symlog axis from a power of ten below the
    lowest to 0.5; rewards that never do (pass/fail, in [0, 1]) a linear one.
    """
    finite = [run.stats.mean[:, per_run_columns[r]] for r, run in enumerate(runs)]
    values = np.concatenate([f.ravel() for f in finite] + curves)
    values = values[np.isfinite(values)]
    symlog = not values.size or values.min() < 0
    if symlog:
        lowest = min(values.min(initial=-3.0), -3.0)
        return (-(10 ** math.ceil(math.log10(-lowest * 1.2))), 0.5), True
    return (-0.05, max(1.05, 1.05 * values.max())), False


def _draw_reward_curves(
    ax, runs: Sequence[RunLog], colors: List[str], limits: Tuple[float, float], symlog: bool
) -> None:
    """Draws each run's batch-mean reward curve on ``ax`` (a legend entry alone for a run without metrics.csv)."""
    for run, color in zip(runs, colors):
        if run.reward_mean is None:
            ax.plot([], [], color=color, lw=1.2, label=f"{run.label} (no {METRICS_FILE})")
        else:
            ax.plot(run.epoch, run.reward_mean, color=color, lw=1.2, label=run.label)
    if any(run.reward_mean is not None for run in runs):
        _reward_axis(ax, limits, symlog)
        ax.set_xlabel("epoch")
        ax.set_ylabel("batch reward")
        ax.set_title("All prompts: batch-mean reward")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    else:
        ax.axis("off")
        ax.set_title(f"All prompts: no batch-mean reward (no {METRICS_FILE})")
        ax.legend(loc="center")


def plot_prompt_stats(runs: Sequence[RunLog], columns: Sequence[int], path: str) -> None:
    """Draws the reward curve and a grid of per-prompt panels, and saves a PNG.

    Each prompt's panel shares both axes with the others: a symlog reward
    axis for rewards that go negative (the distance problem's: convergence
    near 0 stays visible next to starts near -200), a linear one from 0 to 1
    for rewards that never do (the pass/fail problem's).
    Epochs where the first run's prompt still used batch statistics are
    shaded grey. Runs without metrics.csv have no reward curve (only a
    legend entry).

    Args:
        runs: one or more runs of one problem (``check_same_problem``); their
            prompts are matched by name.
        columns: columns of the first run's log to draw (``choose_prompts``).
        path: the PNG file to write.

    Raises:
        RunMismatchError: if the runs are of different problems, or a run did
            not record one of the chosen prompts.
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    check_same_problem(runs)
    first = runs[0].stats
    names = [first.prompt_names[c] for c in columns]
    prompt_ids = [int(first.prompt_ids[c]) for c in columns]
    per_run_columns = _matching_columns(runs, names)
    curves = [run.reward_mean for run in runs if run.reward_mean is not None]
    limits, symlog = _reward_limits(runs, per_run_columns, curves)

    num_cols = math.ceil(math.sqrt(len(prompt_ids)))
    num_rows = math.ceil(len(prompt_ids) / num_cols)
    top_height = 3.0 if curves else 1.0  # without metrics, the top only holds the legend
    fig = plt.figure(figsize=(max(2.3 * num_cols, 9.0), 2.0 * num_rows + top_height), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, 2.0 * num_rows])
    colors = [f"C{i}" for i in range(len(runs))]

    _draw_reward_curves(top.subplots(), runs, colors, limits, symlog)

    axes = bottom.subplots(num_rows, num_cols, sharex=True, sharey=True, squeeze=False)
    for panel, (ax, name, prompt) in enumerate(zip(axes.flat, names, prompt_ids)):
        for r, (run, color) in enumerate(zip(runs, colors)):
            log, column = run.stats, per_run_columns[r][panel]
            mean, std = log.mean[:, column], log.std[:, column]
            if r == 0:
                ax.fill_between(log.step, *limits, where=log.fallback[:, column], color="0.88", lw=0, step="mid")
            ax.plot(log.step, log.batch_reward_mean[:, column], ".", color=color, ms=1.5, alpha=0.35)
            ax.fill_between(log.step, mean - std, mean + std, color=color, alpha=0.25, lw=0)
            ax.plot(log.step, mean, color=color, lw=1.0)
        ax.set_title(f"{name} ({prompt})", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    _reward_axis(axes[0][0], limits, symlog)
    for ax in axes.flat[len(prompt_ids) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("reward", fontsize=8)
    bottom.suptitle(
        "Per prompt: tracked mean (line) +- std (band), batch rewards (dots); grey: still on batch statistics",
        fontsize=10,
    )
    fig.savefig(path, dpi=80)
    plt.close(fig)
