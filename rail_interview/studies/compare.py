"""Compare stat-tracking settings over several seeds: tables and learning curves.

A *setting* is a name plus config overrides, for example
``Setting("ema 0.9", {"stat_tracking.method": "ema", "stat_tracking.ema_decay": 0.9})``.
``run_comparison`` trains every setting with every seed (in parallel
processes), then ``summarize`` reduces the runs to one row per setting, and
``write_markdown``, ``write_csv`` and ``plot_curves`` write the results.
``method_settings`` turns method names such as ``"buffer"`` or
``"rloo+ema"`` into settings, after ``check_sweep`` (with
``parse_buffer_sizes`` and ``parse_ema_decays``) has checked them, and
``check_settings`` builds every setting's tracker once, so that a bad
setting fails before any training. ``scripts/compare.py`` is the
command-line front end.

It compares on whichever problem the base config names
(``config.problem.name``): on the pass/fail problem the tables add the
medians of its metrics (the true pass rate and the share of zero-variance
groups, each at the end and averaged over the run) and the curves use a
linear axis.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import ml_collections

from rail_interview import training
from rail_interview.configs import apply_overrides
from rail_interview.stat_tracking import presets

logger = logging.getLogger(__name__)

#: Reward values labelled on the symlog axis of the learning-curve plots.
REWARD_TICKS = (0, -1, -2, -3, -5, -10, -20, -30, -50, -100, -200, -1000, -10_000, -100_000, -1_000_000)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration to compare.

    Attributes:
        name: label used in tables and plots.
        overrides: dotted config paths to values, applied to the base config.
    """

    name: str
    overrides: Mapping[str, Any]


def parse_method(name: str) -> Tuple[str, str]:
    """Splits a method name into its ``config.stat_tracking`` method and the memory it sweeps.

    Args:
        name: a name of the preset registry (``batch``, ``buffer``, ``ema``,
            ``grpo``, ``dr_grpo``, ``rloo``, ``ddpo``, ``spo``, ...), or
            ``METHOD+MEMORY`` with MEMORY one of ``training.MEMORIES`` but
            "none" (buffer, ema, beta) and METHOD one that takes a memory
            (``training.memory_methods()``: the GRPO family).

    Returns:
        (method, memory), memory one of ``training.MEMORIES``: the memory
        named after "+", or the method's own (a method whose preset takes
        ``buffer_size`` keeps a buffer, one that takes ``decay`` an EMA, one
        that takes ``rho`` a Beta memory): ``"buffer"`` gives ("buffer",
        "buffer"), ``"batch"`` ("batch", "none"), ``"rloo+ema"`` ("rloo",
        "ema"), ``"spo"`` ("spo", "beta").

    Raises:
        ValueError: for an unknown method or memory.
    """
    method, _, memory = name.partition("+")
    takes_memory = training.memory_methods()
    memories = training.config.MEMORIES[1:]
    methods = training.config.single_reward_methods()
    if method not in methods or (memory and method not in takes_memory) or memory not in ("", *memories):
        raise ValueError(
            f"unknown method {name!r}: choose from {', '.join(methods)}, or METHOD+MEMORY with METHOD "
            f"one of {', '.join(takes_memory)} and MEMORY one of {', '.join(memories)}"
        )
    if memory or method in takes_memory:
        return method, memory or "none"
    parameters = presets.parameters(method)
    if "buffer_size" in parameters:
        return method, "buffer"
    return method, "ema" if "decay" in parameters else "beta" if "rho" in parameters else "none"


def parse_buffer_sizes(values: Sequence[Union[str, int]]) -> List[int]:
    """Parses and checks buffer sizes to sweep.

    Args:
        values: sizes, as integers or strings (a command line's).

    Returns:
        The sizes as integers, in order.

    Raises:
        ValueError: for a size that is not a whole number >= 1, or one listed twice.
    """
    sizes = []
    for value in values:
        try:
            size = int(value) if isinstance(value, str) else value
        except ValueError:
            size = None
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"buffer sizes must be whole numbers >= 1, got {value!r}")
        if size in sizes:
            raise ValueError(f"buffer size {size} is listed twice")
        sizes.append(size)
    return sizes


def parse_ema_decays(values: Sequence[Union[str, float]]) -> List[float]:
    """Parses and checks EMA decays to sweep.

    Args:
        values: decays, as numbers or strings (a command line's).

    Returns:
        The decays as floats, in order.

    Raises:
        ValueError: for a decay outside the open interval (0, 1), or two
            decays that would share a setting name (as ``{decay:g}`` writes them).
    """
    decays = []
    for value in values:
        try:
            decay = float(value)
        except (TypeError, ValueError):
            decay = math.nan
        if isinstance(value, bool) or not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decays must be numbers in the open interval (0, 1), got {value!r}")
        if any(f"{decay:g}" == f"{d:g}" for d in decays):
            raise ValueError(f"EMA decay {decay:g} is listed twice")
        decays.append(decay)
    return decays


def check_sweep(
    methods: Sequence[str],
    buffer_sizes: Sequence[Union[str, int]] = (),
    ema_decays: Sequence[Union[str, float]] = (),
) -> None:
    """Checks the arguments of ``method_settings`` before any setting is built.

    Args:
        methods: method names, see ``parse_method``; at least one, none twice.
        buffer_sizes: buffer sizes to sweep, see ``parse_buffer_sizes``; only
            with a method that has a buffer memory (``buffer`` or
            METHOD+buffer), and at least 2 with a GRPO-family one, whose
            min_count is at least 2.
        ema_decays: decays to sweep, see ``parse_ema_decays``; only with a
            method that has an EMA memory (``ema`` or METHOD+ema).

    Raises:
        ValueError: naming the argument at fault (``methods``,
            ``buffer_sizes`` or ``ema_decays``) and what it allows.
    """
    if not methods:
        raise ValueError(
            f"methods is empty: name at least one of {', '.join(presets.names())}, or METHOD+buffer or METHOD+ema"
        )
    memories: Dict[str, List[str]] = {}
    for i, name in enumerate(methods):
        method, memory = parse_method(name)
        if name in methods[:i]:
            raise ValueError(f"method {name!r} is listed twice in methods")
        memories.setdefault(memory, []).append(name)
    sizes, decays = parse_buffer_sizes(buffer_sizes), parse_ema_decays(ema_decays)
    if sizes and "buffer" not in memories:
        raise ValueError(
            "buffer_sizes sweeps buffer memories, but methods has none: add 'buffer' or METHOD+buffer "
            "to methods, or leave buffer_sizes out"
        )
    if decays and "ema" not in memories:
        raise ValueError(
            "ema_decays sweeps EMA memories, but methods has none: add 'ema' or METHOD+ema to methods, "
            "or leave ema_decays out"
        )
    takes_memory = training.memory_methods()
    grpo_buffers = [name for name in memories.get("buffer", []) if parse_method(name)[0] in takes_memory]
    if grpo_buffers and sizes and min(sizes) < 2:
        raise ValueError(
            f"buffer_sizes must be >= 2 with {grpo_buffers[0]!r} (the GRPO family needs 2 rewards per "
            f"prompt, min_count 2), got {min(sizes)}"
        )


def method_settings(
    config: ml_collections.ConfigDict,
    methods: Sequence[str],
    buffer_sizes: Sequence[int] = (),
    ema_decays: Sequence[float] = (),
) -> List[Setting]:
    """Turns method names into settings, sweeping buffer sizes and EMA decays.

    Names and the settings they give (K, m and decay default to the config's
    ``buffer_size``, ``min_count`` and ``ema_decay``):

    ================= ============================ ============================================
    method            setting names                config
    ================= ============================ ============================================
    ``batch``         ``batch``                    method batch
    ``buffer``        ``buffer K=32 m=16``         method buffer, per buffer size
    ``ema``           ``ema 0.7``                  method ema, per decay
    ``grpo``          ``grpo``                     method grpo, memory none (also ``dr_grpo``,
                                                   ``rloo``)
    ``grpo+buffer``   ``grpo+buffer K=32 m=16``    method grpo, memory buffer, per buffer size
    ``grpo+ema``      ``grpo+ema 0.7``             method grpo, memory ema, per decay
    ================= ============================ ============================================

    With a buffer size swept, min_count is min(config min_count, K // 2), at
    least 1 for ``buffer`` and 2 for the GRPO family (its ddof 1 and
    leave-one-out need two rewards), so that small buffers still switch on.

    Args:
        config: the base config (default buffer size, min_count and decay).
        methods: method names, as above.
        buffer_sizes: buffer sizes to sweep for buffer memories; empty for the config's.
        ema_decays: decays to sweep for EMA memories; empty for the config's.

    Returns:
        The settings, in the order of ``methods``.

    Raises:
        ValueError: for anything ``check_sweep`` refuses: an unknown method
            or memory, a repeated method, size or decay, a size or decay out
            of range, or a sweep that no method uses.
    """
    check_sweep(methods, buffer_sizes, ema_decays)
    buffer_sizes, ema_decays = parse_buffer_sizes(buffer_sizes), parse_ema_decays(ema_decays)
    tracking = config.stat_tracking
    settings = []
    for name in methods:
        method, memory = parse_method(name)
        grpo = method in training.memory_methods()
        base = {"stat_tracking.method": method}
        if grpo:
            base["stat_tracking.memory"] = memory
        if memory == "buffer":
            for size in buffer_sizes or [tracking.buffer_size]:
                min_count = min(tracking.min_count, max(2 if grpo else 1, size // 2))
                settings.append(
                    Setting(
                        f"{name} K={size} m={min_count}",
                        {**base, "stat_tracking.buffer_size": size, "stat_tracking.min_count": min_count},
                    )
                )
        elif memory == "ema":
            for decay in ema_decays or [tracking.ema_decay]:
                settings.append(Setting(f"{name} {decay:g}", {**base, "stat_tracking.ema_decay": decay}))
        else:
            settings.append(Setting(name, base))
    return settings


@dataclasses.dataclass
class RunResult:
    """What one training run of a comparison produced.

    Attributes:
        setting: the setting's name.
        seed: the run's seed.
        final_reward: from the run's summary.
        train_seconds: wall-clock of the run's training loop.
        rewards: the batch-mean reward of every epoch.
        run_dir: where the run wrote its logs.
        finals: the problem's own metrics, by their names in the run's
            summary: ``final_<metric>`` (a mean over the epochs final_reward
            averages) and ``mean_<metric>`` (over every epoch), such as
            ``final_pass_rate`` and ``mean_pass_rate``; empty for the
            distance problem.
    """

    setting: str
    seed: int
    final_reward: float
    train_seconds: float
    rewards: List[float]
    run_dir: str
    finals: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SettingSummary:
    """The runs of one setting, reduced over seeds.

    Attributes:
        setting: the setting's name.
        num_runs: how many seeds.
        median: median final_reward.
        best: highest final_reward.
        worst: lowest final_reward.
        num_bad: runs with final_reward below ``bad_threshold`` (stalled or
            diverged).
        median_seconds: median training-loop wall-clock.
        finals: the median over seeds of each of the problem's metrics in
            ``RunResult.finals`` (``final_<metric>`` and ``mean_<metric>``).
    """

    setting: str
    num_runs: int
    median: float
    best: float
    worst: float
    num_bad: int
    median_seconds: float
    finals: Dict[str, float] = dataclasses.field(default_factory=dict)


def _run_one(config_dict: Dict[str, Any], logdir: str, setting: str) -> RunResult:
    """Trains once; runs in a worker process (one thread: the workers share the cores)."""
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(1)
    config = ml_collections.ConfigDict(config_dict)
    summary = training.train(config, logdir)
    with open(os.path.join(summary["run_dir"], "metrics.csv"), newline="", encoding="utf-8") as f:
        rewards = [float(row["reward_mean"]) for row in csv.DictReader(f)]
    finals = {
        name: value
        for name, value in summary.items()
        if name.startswith(("final_", "mean_")) and name not in ("final_reward", "final_reward_epochs")
    }
    return RunResult(
        setting, config.seed, summary["final_reward"], summary["train_seconds"], rewards, summary["run_dir"], finals
    )


def check_settings(base_config: ml_collections.ConfigDict, settings: Sequence[Setting]) -> None:
    """Builds every setting's config and tracker once, here, so that a bad setting fails before any training.

    A setting that would only fail inside a worker process of
    ``run_comparison`` (an unknown config field, any value
    ``training.validate_config`` refuses, a min_count the tracker refuses,
    a CUDA device that is not there) fails here instead, with the
    setting's name. ``validate_config`` builds each tracker on the CPU
    for one prompt: this checks their arguments, not the problem's size.

    Args:
        base_config: the config every setting starts from.
        settings: what to compare.

    Raises:
        ValueError: if there is no setting, if setting names repeat, or for
            the first setting whose config or tracker is refused, naming it.
    """
    names = [s.name for s in settings]
    if not names:
        raise ValueError("there is no setting to compare")
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be distinct, got {names}")
    for setting in settings:
        try:
            config = apply_overrides(base_config, setting.overrides)
            training.validate_config(config)  # builds the setting's tracker once, for one prompt
        except KeyError as error:
            raise ValueError(f"setting {setting.name!r}: {error.args[0] if error.args else error}") from error
        except ValueError as error:
            raise ValueError(f"setting {setting.name!r}: {error}") from error


def run_comparison(
    base_config: ml_collections.ConfigDict,
    settings: Sequence[Setting],
    seeds: Sequence[int],
    logdir: str,
    *,
    num_workers: Optional[int] = None,
) -> List[RunResult]:
    """Trains every setting with every seed, in parallel worker processes.

    Args:
        base_config: the config every setting starts from.
        settings: what to compare; names must be distinct.
        seeds: seeds to run each setting with.
        logdir: parent directory of every run's directory.
        num_workers: worker processes; defaults to the number of CPU cores.

    Returns:
        One result per (setting, seed), in the order of ``settings`` then
        ``seeds``.

    Raises:
        ValueError: before any training, for what ``check_settings``
            refuses: no setting, repeated setting names, an override naming
            a field the config lacks, a setting whose tracker is refused.
    """
    check_settings(base_config, settings)
    jobs = []
    for setting in settings:
        config = apply_overrides(base_config, setting.overrides)
        for seed in seeds:
            config.seed = seed
            jobs.append((config.to_dict(), setting.name))
    num_workers = num_workers or os.cpu_count() or 1
    results: Dict[int, RunResult] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
        futures = {pool.submit(_run_one, config, logdir, name): i for i, (config, name) in enumerate(jobs)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            result = future.result()
            results[futures[future]] = result
            logger.info(
                "[%d/%d] %-14s seed %d: final_reward %8.2f (loop %.2f s)",
                done,
                len(jobs),
                result.setting,
                result.seed,
                result.final_reward,
                result.train_seconds,
            )
    return [results[i] for i in range(len(jobs))]


def summarize(results: Sequence[RunResult], *, bad_threshold: float = -20.0) -> List[SettingSummary]:
    """Reduces runs to one row per setting, in first-seen order.

    Args:
        results: runs, as returned by ``run_comparison``.
        bad_threshold: a run whose final_reward is below this counts as bad.
            The default is the distance problem's; pass
            ``problems.bad_final_reward("pass_fail")`` for the pass/fail one.

    Returns:
        One summary per setting, with the median over seeds of each of the
        problem's metrics (``final_<metric>`` and ``mean_<metric>``) in
        ``finals``.
    """
    by_setting: Dict[str, List[RunResult]] = {}
    for result in results:
        by_setting.setdefault(result.setting, []).append(result)
    summaries = []
    for name, runs in by_setting.items():
        finals = [r.final_reward for r in runs]
        summaries.append(
            SettingSummary(
                setting=name,
                num_runs=len(runs),
                median=statistics.median(finals),
                best=max(finals),
                worst=min(finals),
                num_bad=sum(f < bad_threshold for f in finals),
                median_seconds=statistics.median(r.train_seconds for r in runs),
                finals={name: statistics.median(r.finals[name] for r in runs) for name in runs[0].finals},
            )
        )
    return summaries


def format_markdown(summaries: Sequence[SettingSummary], *, bad_threshold: float = -20.0) -> str:
    """Formats summaries as a Markdown table.

    Args:
        summaries: as returned by ``summarize``.
        bad_threshold: the threshold ``summarize`` used, for the header.

    Returns:
        The table, ending with a newline.
    """
    extra = list(summaries[0].finals) if summaries else []
    lines = [
        f"| setting | median final_reward | best | worst | runs below {bad_threshold:g} | median loop s |"
        + "".join(f" median {name} |" for name in extra),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(extra),
    ]
    for s in summaries:
        lines.append(
            f"| {s.setting} | {s.median:.2f} | {s.best:.2f} | {s.worst:.2f} | "
            f"{s.num_bad}/{s.num_runs} | {s.median_seconds:.2f} |"
            + "".join(f" {s.finals[name]:.3f} |" for name in extra)
        )
    return "\n".join(lines) + "\n"


def write_csv(results: Sequence[RunResult], path: str) -> None:
    """Writes one row per run: setting, seed, final_reward, train_seconds, run_dir, then the problem's metrics.

    Args:
        results: runs, as returned by ``run_comparison``.
        path: the CSV file to write.
    """
    extra = list(results[0].finals) if results else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "seed", "final_reward", "train_seconds", "run_dir"] + extra)
        for r in results:
            writer.writerow(
                [r.setting, r.seed, f"{r.final_reward:.4f}", f"{r.train_seconds:.4f}", r.run_dir]
                + [f"{r.finals[name]:.4f}" for name in extra]
            )


def _panels(curves: Mapping[str, Any]) -> Tuple[List[List[str]], List[str], bool]:
    """Groups settings into panels by method (the first word up to any "+"), as ``plot_curves`` describes.

    Returns:
        The panels (setting names each), the single-setting methods drawn as
        references in every panel, and whether any method has a sweep.
    """
    families: Dict[str, List[str]] = {}
    for name in curves:
        families.setdefault(name.split()[0].split("+")[0], []).append(name)
    sweeps = [names for names in families.values() if len(names) > 1]
    if not sweeps:
        return [[names[0] for names in families.values()]], [], False
    return sweeps, [names[0] for names in families.values() if len(names) == 1], True


def plot_curves(results: Sequence[RunResult], path: str, *, smoothing: int = 10) -> None:
    """Plots reward against epoch: per setting, the median over seeds and a min-max band.

    Settings are grouped by method, the first word of their name up to any
    "+" ("buffer K=8 m=4" belongs to "buffer", "rloo+ema 0.7" to "rloo").
    If every method has one setting, all share one panel. Otherwise each
    method with several settings (a sweep, or a GRPO-family method with
    several memories) gets a panel, coloured in setting order, and the
    single-setting methods (such as "batch") are drawn in every panel as grey
    references, each in its own line style.

    Rewards that are never negative (the pass/fail problem's, in [0, 1]) get
    a linear axis; others a symlog axis, on which the distance problem's
    rewards (-1000 to -1) and their early divergences both show.

    Args:
        results: runs, as returned by ``run_comparison``.
        path: the PNG file to write.
        smoothing: each seed's curve is first averaged over this many epochs
            (a trailing window), so that the bands show seed-to-seed spread
            rather than epoch-to-epoch noise; fewer when the shortest run
            has fewer epochs.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from rail_interview.stats_plots import label_symlog_rewards  # pylint: disable=import-outside-toplevel

    curves: Dict[str, List[List[float]]] = {}
    for r in results:
        curves.setdefault(r.setting, []).append(r.rewards)
    panels, references, sweeps = _panels(curves)
    smoothing = max(1, min([smoothing] + [len(r.rewards) for r in results]))  # a window no longer than a run
    linear = all(reward >= 0 for r in results for reward in r.rewards)

    def draw(ax, name: str, color, style: str = "-") -> None:
        """Draws one setting's median curve and its min-max band on ``ax``."""
        length = min(len(c) for c in curves[name])
        window = np.ones(smoothing) / smoothing
        smoothed = np.stack([np.convolve(c[:length], window, mode="valid") for c in curves[name]])  # [seeds, E']
        epochs = np.arange(smoothing, length + 1)
        ax.plot(
            epochs, np.median(smoothed, axis=0), style, color=color, lw=1.6, label=f"{name} ({len(curves[name])} seeds)"
        )
        ax.fill_between(epochs, smoothed.min(axis=0), smoothed.max(axis=0), color=color, alpha=0.13)

    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False, sharey=True, constrained_layout=True
    )
    for ax, names in zip(axes[0], panels):
        colors = (
            plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(names)))
            if sweeps
            else [f"C{i}" for i in range(len(names))]
        )
        for name, color in zip(names, colors):
            draw(ax, name, color)
        for name, style in zip(references, itertools.cycle(("--", ":", "-."))):
            draw(ax, name, "0.45", style)
        if not linear:
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("epoch")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        if sweeps:
            ax.set_title(f"{names[0].split()[0].split('+')[0]} sweep")
    if linear:
        axes[0][0].set_ylabel(f"batch-mean reward ({smoothing}-epoch average)")
    else:
        label_symlog_rewards(axes[0][0], REWARD_TICKS)
        axes[0][0].set_ylabel(f"batch-mean reward ({smoothing}-epoch average; symlog scale)")
    fig.suptitle("Learning curves: median over seeds, band from worst to best seed")
    fig.savefig(path, dpi=100)
    plt.close(fig)
