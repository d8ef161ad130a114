"""The training loop on a toy problem: ``train(config, logdir) -> summary``.

``scripts/train.py`` parses flags and calls ``train``; tests call it directly
with tiny configs. Each call writes a new run directory under ``logdir``:

    <logdir>/<YYYYmmdd-HHMMSS>_<method>[+<memory>]_seed<seed>[_<n>]/
        config.json   the resolved config
        metrics.csv   one row per epoch: epoch, reward_mean, reward_std,
                      fallback_frac (fraction of samples whose prompt had
                      fewer than min_count rewards: normalised with
                      whole-batch statistics, or for the GRPO family without
                      memory, given config.stat_tracking.fallback), then the
                      problem's own metrics (the pass/fail problem's
                      pass_rate and zero_variance_frac)
        summary.json  final_reward, method, seed, train_seconds, ...
        stats/        per-prompt tracker statistics, every
                      ``config.stats_log.every`` epochs (see
                      ``rail_interview.stat_tracking.recording``)
        checkpoint.pt the state to resume from (``checkpointing``)
        train_time.json  loop seconds up to the checkpoint, so that a
                      resumed run's summary times the whole run

``config.problem.name`` picks the problem (``rail_interview.problems``):
the original task's "distance" problem or the "pass_fail" one.

A resume is a transaction: everything it needs (the config's compatibility,
the checkpoint on every rank, metrics.csv and the stats log) is checked
before anything is written, and every rank ends with the same error if any
check fails; then the files are rewritten, each atomically.

Per-epoch metrics stay on the device and are read back every
``config.log_every`` epochs, so the loop syncs with the host once per chunk,
not once per epoch.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import ml_collections
import numpy as np
import torch

from rail_interview import checkpointing, configs, distributed, problems, stat_tracking

logger = logging.getLogger(__name__)

#: Columns of metrics.csv after "epoch", in the order of the metrics tensor;
#: the problem's ``metric_names`` follow them.
METRIC_NAMES = ("reward_mean", "reward_std", "fallback_frac")

#: Subdirectory of a run that holds the per-prompt stats log.
STATS_DIR = "stats"

#: final_reward averages the batch-mean reward over this many last epochs (all of them in a shorter run).
FINAL_REWARD_EPOCHS = 10

#: Loop seconds up to the latest checkpoint, beside it in the run directory.
TRAIN_TIME_FILE = "train_time.json"

#: The config fields a resumed run may change: none of them changes what the
#: run computes (epochs, parameters, metrics), only how long it runs, how
#: often it writes, or how fast.
RESUMABLE_FIELDS = (
    "num_epochs",
    "log_every",
    "checkpoint_every",
    "num_threads",
    "stats_log.every",
    "stat_tracking.check_values",
)


class ConfigError(ValueError):
    """A config value training cannot use, or a change a resume may not make; the message names the field."""


def resolve_device(name: str) -> torch.device:
    """Turns the config's device name into a torch device.

    Args:
        name: "auto" (CUDA when available, else CPU), "cpu" or "cuda".

    Returns:
        The device.

    Raises:
        ConfigError: for another name, or "cuda" without a GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"config.device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config.device is 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'")
    return stat_tracking.resolve_device(name)


#: The methods of ``config.stat_tracking.method``: the three trackers of this
#: project, then the GRPO family, built from ``presets``.
METHODS = ("buffer", "ema", "batch", "grpo", "dr_grpo", "rloo")

#: GRPO-family methods: (preset, its keywords). "grpo" is verl's (and TRL's
#: scale_rewards="group") group mean and sample std, "dr_grpo" the group mean
#: without a std, "rloo" the leave-one-out mean without a std.
GRPO_FAMILY = {
    "grpo": ("verl_grpo", {}),
    "dr_grpo": ("verl_grpo", {"norm_adv_by_std": False}),
    "rloo": ("verl_rloo", {}),
}

#: The memories of ``config.stat_tracking.memory`` (GRPO-family methods only).
MEMORIES = ("none", "buffer", "ema")

#: The fallbacks of ``config.stat_tracking.fallback`` (GRPO-family methods only).
FALLBACKS = ("zero", "raw", "batch")


def method_name(config: ml_collections.ConfigDict) -> str:
    """A run's method with its memory, as in run directory names: ``"buffer"``, ``"grpo"``, ``"rloo+ema"``.

    Args:
        config: the ``stat_tracking`` section of the training config.

    Returns:
        ``method``, followed by ``+memory`` where the memory is not ``"none"``.
    """
    memory = config.get("memory", "none")
    return config.method if memory == "none" else f"{config.method}+{memory}"


def build_tracker(
    config: ml_collections.ConfigDict,
    *,
    num_prompts: int,
    device: torch.device,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> stat_tracking.StatTracker:
    """Builds the stat tracker that ``config.method`` (and ``config.memory``) name.

    "buffer", "ema" and "batch" are this project's trackers. "grpo",
    "dr_grpo" and "rloo" are ``presets.verl_grpo``,
    ``presets.verl_grpo(norm_adv_by_std=False)`` and ``presets.verl_rloo``:
    with ``memory="none"`` as verl computes them (min_count 2); with
    ``memory="buffer"`` or ``"ema"`` the group statistics come from the
    prompt's memory (``buffer_size`` or ``ema_decay``) and need
    ``min_count`` rewards. A prompt with fewer gets ``config.fallback``:
    ``"zero"`` (TRL's rule for a group of one, the default), ``"raw"``
    (verl's: exactly verl's advantages) or ``"batch"`` (DDPO's).

    Args:
        config: the ``stat_tracking`` section of the training config.
        num_prompts: P.
        device: where the tracker's state lives.
        process_group: ranks that share the tracker's statistics, or None.

    Returns:
        The tracker.

    Raises:
        ConfigError: for an unknown method, memory or fallback, or a memory
            other than "none" with a method that is not of the GRPO family.
    """
    common = dict(device=device, check_values=config.check_values, process_group=process_group)
    memory = config.get("memory", "none")
    if memory not in MEMORIES:
        raise ConfigError(
            f"unknown config.stat_tracking.memory {memory!r}; choose from {', '.join(map(repr, MEMORIES))}"
        )
    if config.method not in METHODS:
        raise ConfigError(
            f"unknown config.stat_tracking.method {config.method!r}; choose from {', '.join(map(repr, METHODS))}"
        )
    if config.method in GRPO_FAMILY:
        preset, options = GRPO_FAMILY[config.method]
        if memory == "buffer":
            options = dict(options, memory="buffer", buffer_size=config.buffer_size)
        elif memory == "ema":
            options = dict(options, memory="ema", decay=config.ema_decay)
        if memory != "none":
            options.update(min_count=config.min_count)
        fallback = config.get("fallback", "zero")
        if fallback not in FALLBACKS:
            raise ConfigError(
                f"unknown config.stat_tracking.fallback {fallback!r}; choose from {', '.join(map(repr, FALLBACKS))}"
            )
        return getattr(stat_tracking.presets, preset)(num_prompts, fallback=fallback, **options, **common)
    if memory != "none":
        raise ConfigError(
            f"config.stat_tracking.memory={memory!r} applies to the GRPO family "
            f"({', '.join(map(repr, GRPO_FAMILY))}); method {config.method!r} has its own: leave memory 'none'"
        )
    if config.method == "batch":
        return stat_tracking.BatchStatTracker(num_prompts, **common)
    if config.method == "buffer":
        return stat_tracking.BufferStatTracker(
            num_prompts, buffer_size=config.buffer_size, min_count=config.min_count, **common
        )
    return stat_tracking.EmaStatTracker(num_prompts, decay=config.ema_decay, min_count=config.min_count, **common)


def fallback_mask(tracker: stat_tracking.StatTracker, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Which samples of the batch just updated fell back (their prompt had too few rewards).

    ``tracker.fallback_mask``, except for an ``AdvantageTracker`` without
    memory that has per-prompt statistics (the GRPO family with
    ``memory="none"``): it remembers nothing after the update, so its
    prompts' counts are their samples in this batch, counted here.

    Args:
        tracker: the tracker ``update`` was just called on with ``prompt_ids``.
        prompt_ids: int64 [N], the whole (gathered) batch.

    Returns:
        bool [N].
    """
    if isinstance(tracker, stat_tracking.AdvantageTracker) and tracker.memory == "none" and tracker.min_count > 1:
        counts = torch.zeros(tracker.num_prompts, dtype=torch.int64, device=prompt_ids.device)  # [P]
        counts.index_add_(0, prompt_ids, torch.ones_like(prompt_ids))  # no host sync, unlike bincount
        return counts.index_select(0, prompt_ids) < tracker.min_count
    return tracker.fallback_mask(prompt_ids)


def create_run_dir(logdir: str, name: str) -> str:
    """Creates a new, empty run directory under ``logdir``.

    Never reuses a directory: if ``name`` exists, ``name_1``, ``name_2``, ...
    are tried, so concurrent runs and reruns neither mix nor overwrite.

    Args:
        logdir: parent directory, created if missing.
        name: preferred directory name.

    Returns:
        The path of the new directory.
    """
    os.makedirs(logdir, exist_ok=True)
    suffix = 0
    while True:
        path = os.path.join(logdir, name if suffix == 0 else f"{name}_{suffix}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            suffix += 1


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def load_run_config(run_dir: str, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
    """Returns the config a run was started with, with ``overrides`` applied.

    ``scripts/train.py --resume`` uses it: the run's own config.json, plus the
    fields given on the command line (typically a larger ``num_epochs``).

    Args:
        run_dir: a run directory written by ``train``.
        overrides: dotted field paths to values, e.g. ``{"num_epochs": 2000}``.

    Returns:
        The config.

    Raises:
        FileNotFoundError: if ``run_dir`` holds no config.json.
        KeyError: if an override names a field the config lacks.
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} holds no config.json: pass the run directory that train.py printed")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    saved.get("problem", {}).setdefault("name", "distance")  # runs written before the field existed
    return configs.apply_overrides(ml_collections.ConfigDict(saved), overrides or {})


def _sampling_generator(
    config: ml_collections.ConfigDict, generator: torch.Generator, context: distributed.DistributedContext
) -> torch.Generator:
    """The generator a rank samples prompts and answers with.

    Rank 0 keeps drawing from the instance's generator, so a single process
    runs exactly as it always has; rank r > 0 gets its own seed, derived from
    the run's seed, so that ranks draw different samples.
    """
    if context.rank == 0:
        return generator
    seeds = torch.randint(2**62, (context.world_size,), generator=torch.Generator().manual_seed(config.seed))
    return torch.Generator(device=generator.device).manual_seed(int(seeds[context.rank]))


def _prompt_generator(
    config: ml_collections.ConfigDict, problem: Any, sampler: torch.Generator, context: distributed.DistributedContext
) -> torch.Generator:
    """The generator a rank draws its prompt ids with.

    Its ``sampler``, unless the problem draws a step's prompts for every rank
    at once (``problem.shares_prompt_draws``: the pass/fail problem, whose
    ranks must not share a prompt) and there are several ranks: then one
    generator, seeded alike on every rank from the run's seed, of whose
    draws each rank keeps its slice. One process is unchanged.
    """
    if context.world_size == 1 or not problem.shares_prompt_draws:
        return sampler
    seeds = torch.Generator().manual_seed(config.seed)
    torch.randint(2**62, (context.world_size,), generator=seeds)  # the ranks' sampling seeds, as above
    return torch.Generator(device=sampler.device).manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))


class _MetricsFile:
    """metrics.csv of a run: appended to in chunks, truncated when a run resumes.

    Args:
        path: the file.
        names: the columns after "epoch".
    """

    def __init__(self, path: str, names: Tuple[str, ...] = METRIC_NAMES) -> None:
        self.path = path
        self.names = tuple(names)

    def create(self) -> None:
        """Writes a new file holding only the header row."""
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(("epoch",) + self.names)

    def append(self, first_epoch: int, rows: List[List[float]]) -> None:
        """Appends rows for epochs ``first_epoch``, ``first_epoch + 1``, ..."""
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([first_epoch + i, *values] for i, values in enumerate(rows))

    def rows_before(self, epoch: int) -> List[List[str]]:
        """The header and the rows of epochs 0 .. ``epoch - 1``, checked; what follows them is ignored.

        A run killed while appending may leave a partial last line; rows past
        the checkpoint are recomputed anyway, so only the ones before
        ``epoch`` must be whole.

        Raises:
            checkpointing.CheckpointError: if the file is missing, or a row
                before ``epoch`` is missing or malformed (the message names
                the file and the first bad epoch).
        """
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except OSError as error:
            raise checkpointing.CheckpointError(f"cannot read {self.path}: {error}") from error
        header = ["epoch", *self.names]
        if not rows or rows[0] != header:
            raise checkpointing.CheckpointError(f"{self.path} does not start with the header {','.join(header)}")
        for expected, row in enumerate(rows[1 : epoch + 1]):
            try:
                whole = (
                    len(row) == len(header)
                    and int(row[0]) == expected
                    and all(math.isfinite(float(value)) or value == "nan" for value in row[1:])
                )
            except ValueError:
                whole = False
            if not whole:
                raise checkpointing.CheckpointError(
                    f"{self.path} is damaged at epoch {expected} (row {row}), before the checkpoint's epoch "
                    f"{epoch}: those metrics cannot be recomputed from the checkpoint. Restore the file, or "
                    "start a new run"
                )
        if len(rows) - 1 < epoch:
            raise checkpointing.CheckpointError(
                f"{self.path} holds epochs 0 to {len(rows) - 2} only, but the checkpoint is at epoch {epoch}: "
                "the rows in between are lost and cannot be recomputed. Restore the file, or start a new run"
            )
        return rows[: epoch + 1]

    def rewrite(self, rows: List[List[str]]) -> None:
        """Replaces the file with ``rows`` (the header first), atomically."""
        temporary = self.path + ".tmp"
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
        os.replace(temporary, self.path)

    def means(self) -> Tuple[Dict[str, float], Dict[str, float], int]:
        """Each column's mean over the last ``FINAL_REWARD_EPOCHS`` rows (fewer in a shorter run) and over every row.

        Returns:
            The means over the last rows, the means over every row, and how
            many rows the first averages.
        """
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        last = rows[-FINAL_REWARD_EPOCHS:]

        def mean(name: str, chosen: List[Dict[str, str]]) -> float:
            """The mean of column ``name`` over the ``chosen`` rows."""
            return sum(float(row[name]) for row in chosen) / len(chosen)

        return {n: mean(n, last) for n in self.names}, {n: mean(n, rows) for n in self.names}, len(last)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value training reads, before any work, with messages that name the field.

    Args:
        config: a training config (``configs/default.py``).

    Raises:
        ConfigError: naming the first field with a value training cannot
            use, and the values it can.
    """

    def number(name: str, value: Any, low: float, *, integer: bool, inclusive: bool = True) -> None:
        """Raises ConfigError unless ``config.<name>`` is a finite int (or number) >= ``low`` (> if not inclusive)."""
        kind = "an int" if integer else "a number"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else (int, float))
            or not math.isfinite(value)
            or value < low
            or (not inclusive and value == low)
        ):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"config.{name} must be {kind} {bound}, got {value!r}")

    for name in ("num_epochs", "log_every", "sample_batch_size"):
        number(name, config[name], 1, integer=True)
    number("checkpoint_every", config.checkpoint_every, 0, integer=True)
    if config.checkpoint_every % config.log_every:
        raise ConfigError(
            f"config.checkpoint_every ({config.checkpoint_every}) must be 0 or a multiple of config.log_every "
            f"({config.log_every}), so that checkpoints fall where metrics are written"
        )
    number("num_threads", config.get("num_threads", 0), 0, integer=True)
    number("learning_rate", config.learning_rate, 0, integer=False, inclusive=False)
    number("stats_log.every", config.stats_log.every, 0, integer=True)
    number("stats_log.max_prompts", config.stats_log.max_prompts, 1, integer=True)
    tracking = config.stat_tracking
    number("stat_tracking.buffer_size", tracking.buffer_size, 1, integer=True)
    number("stat_tracking.min_count", tracking.min_count, 1, integer=True)
    decay = tracking.ema_decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ConfigError(f"config.stat_tracking.ema_decay must lie in (0, 1), got {decay!r}")
    for name, value, choices in (
        ("method", tracking.method, METHODS),
        ("memory", tracking.get("memory", "none"), MEMORIES),
        ("fallback", tracking.get("fallback", "zero"), FALLBACKS),
    ):
        if value not in choices:
            raise ConfigError(
                f"unknown config.stat_tracking.{name} {value!r}; choose from {', '.join(map(repr, choices))}"
            )
    if tracking.get("memory", "none") != "none" and tracking.method not in GRPO_FAMILY:
        raise ConfigError(
            f"config.stat_tracking.memory={tracking.memory!r} applies to the GRPO family "
            f"({', '.join(map(repr, GRPO_FAMILY))}); method {tracking.method!r} has its own: leave memory 'none'"
        )
    try:
        problems.check_config(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    resolve_device(config.device)


def _flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """A config (or its JSON dict) as dotted field names to values."""
    items = config.items() if hasattr(config, "items") else []
    flat: Dict[str, Any] = {}
    for name, value in items:
        if hasattr(value, "items"):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def check_resume_config(saved: Dict[str, Any], config: ml_collections.ConfigDict) -> None:
    """Refuses a resume whose config changes a field other than ``RESUMABLE_FIELDS``.

    Args:
        saved: the run's config.json, as a dict.
        config: the config the resume would run with.

    Raises:
        ConfigError: naming the first changed field, its two values and the
            fields a resume may change.
    """
    before, after = _flatten(saved), _flatten(json.loads(config.to_json()))
    before.setdefault("problem.name", "distance")  # runs written before the field existed
    for name in sorted(set(before) | set(after)):
        if name in RESUMABLE_FIELDS or before.get(name) == after.get(name):
            continue
        raise ConfigError(
            f"a resume cannot change config.{name} ({before.get(name, 'absent')!r} -> {after.get(name, 'absent')!r}): "
            f"the checkpoint was made with the run's own value. A resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)}; start a new run to change the rest"
        )


def train(
    config: ml_collections.ConfigDict,
    logdir: str,
    *,
    tracker: Optional[stat_tracking.StatTracker] = None,
    resume: bool = False,
) -> Dict[str, Any]:
    """Trains the configured problem's policy with the configured stat tracker.

    Under ``torchrun`` (a default process group initialized, see
    ``rail_interview.distributed``), every rank samples its own prompts, the
    tracker and the policy update see the global batch, so parameters and
    tracker state stay identical on every rank, and rank 0 alone writes.

    Args:
        config: a config as returned by ``configs/default.py:get_config()``.
        logdir: parent directory of the run directory this call creates, or
            with ``resume``, the run directory to continue.
        tracker: a tracker to use instead of the one ``config.stat_tracking``
            describes (a custom implementation, say); it must accept
            ``config.problem.num_prompts`` prompts on the run's device.
        resume: continue the run in ``logdir`` from its checkpoint, up to
            ``config.num_epochs``. Metrics and stats written after the
            checkpoint are dropped and recomputed, so the result equals one
            uninterrupted run, bit for bit.

    Returns:
        The summary also written to ``summary.json``: ``final_reward`` (mean of
        the batch-mean reward over the last ``final_reward_epochs`` epochs,
        10 or all of a shorter run), ``final_<metric>`` for each of the
        problem's metrics over the same epochs (``final_pass_rate`` and
        ``final_zero_variance_frac`` on the pass/fail problem) and
        ``mean_<metric>`` over every epoch of the run (``mean_pass_rate``,
        the area under the pass-rate curve per epoch), ``problem``,
        ``method``, ``seed``, ``num_epochs``,
        ``world_size``, ``train_seconds`` (wall-clock of the training loop
        over ``timed_epochs`` epochs: every epoch of the run, the ones before
        a resume included, unless the run directory lost its
        train_time.json), ``epochs_per_second``, ``resumed_at_epoch`` (0 for
        a run that started here), ``device`` and ``run_dir``.

    Raises:
        ConfigError: for an invalid config, or a resume that changes a field
            it may not (every rank raises it).
        checkpointing.CheckpointError: if ``resume`` finds no usable
            checkpoint on some rank, or a damaged metrics.csv or stats log
            (every rank raises it; nothing was written).
    """
    validate_config(config)
    if config.get("num_threads", 0):
        torch.set_num_threads(config.num_threads)
    context = distributed.current_context()
    try:
        problems.check_config(config, world_size=context.world_size)  # every rank raises the same error
    except ValueError as error:
        raise ConfigError(str(error)) from error
    device = resolve_device(config.device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    problem, policy = problems.make_problem(config, generator)
    sampler = _sampling_generator(config, generator, context)
    prompt_sampler = _prompt_generator(config, problem, sampler, context)
    if tracker is None:
        tracker = build_tracker(
            config.stat_tracking, num_prompts=problem.num_prompts, device=device, process_group=context.group
        )
    elif context.world_size > 1 and tracker.process_group is None:
        raise ValueError("under torchrun, a tracker passed to train() needs process_group= so that ranks agree")
    if device.type == "cuda":
        # index_add_ (the policy update, the EMA tracker) uses float atomics on
        # CUDA, whose rounding varies from run to run; deterministic algorithms
        # keep runs reproducible and ranks' parameters identical.
        torch.use_deterministic_algorithms(True, warn_only=True)

    start_epoch, elapsed, timed_from = 0, 0.0, 0
    num_recorded = min(problem.num_prompts, config.stats_log.max_prompts)
    recorded_names = problem.prompt_names[:num_recorded]
    if resume:
        run_dir = logdir
        # First the config: may this resume change what it changes?
        failure = None
        if context.is_main:
            try:
                _check_run_config(run_dir, config)
            except (checkpointing.CheckpointError, ConfigError) as error:
                failure = error
        _agree(context, failure, "checking the config", main_only=True)
        # Every rank loads the checkpoint; all of them agree on the outcome
        # before anything is written, so that no rank waits for a failed one.
        failure = None
        try:
            checkpoint = checkpointing.load_checkpoint(
                os.path.join(run_dir, checkpointing.CHECKPOINT_FILE), ["epoch", "params", "tracker", "generators"]
            )
            _restore(checkpoint, policy, tracker, sampler, prompt_sampler, context)
            start_epoch = checkpoint["epoch"]
            if start_epoch > config.num_epochs:
                raise checkpointing.CheckpointError(
                    f"the checkpoint is at epoch {start_epoch}, past config.num_epochs = {config.num_epochs}: "
                    "resume with a num_epochs at least that large"
                )
        except (checkpointing.CheckpointError, ConfigError) as error:
            failure = error
        _agree(context, failure, "loading the checkpoint")
        # Rank 0 checks the run directory (config, metrics, stats log), still writing nothing.
        plan, failure = None, None
        if context.is_main:
            try:
                plan = _plan_resume(
                    run_dir, config, start_epoch, recorded_names, METRIC_NAMES + tuple(problem.metric_names)
                )
            except (checkpointing.CheckpointError, ConfigError) as error:
                failure = error
        _agree(context, failure, "checking the run directory", main_only=True)
        if plan is not None:
            elapsed, timed_from = plan["elapsed"], plan["timed_from"]
    elif context.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = create_run_dir(logdir, f"{stamp}_{method_name(config.stat_tracking)}_seed{config.seed}")
    else:
        run_dir = ""
    run_dir = context.broadcast_object(run_dir)
    elapsed, timed_from = context.broadcast_object((elapsed, timed_from))

    metric_names = METRIC_NAMES + tuple(problem.metric_names)
    metrics = _MetricsFile(os.path.join(run_dir, "metrics.csv"), metric_names)
    recorder = None
    if context.is_main:
        stats_dir = os.path.join(run_dir, STATS_DIR)
        if resume:  # all checked: now write, each file atomically
            for path in plan["stale_chunks"]:
                os.remove(path)
            _write_text(os.path.join(run_dir, "config.json"), config.to_json(indent=2) + "\n")
            metrics.rewrite(plan["metrics_rows"])
        else:
            _write_text(os.path.join(run_dir, "config.json"), config.to_json(indent=2) + "\n")
            metrics.create()
        if config.stats_log.every > 0:
            recorder = stat_tracking.PromptStatsRecorder(
                stats_dir,
                tracker,
                torch.arange(num_recorded),
                prompt_names=recorded_names,
                every=config.stats_log.every,
                chunk_size=-(-config.log_every // config.stats_log.every),  # flush about as often as metrics
                append=resume,
            )
        logger.info(
            "Run directory: %s (device %s, %d process(es)%s)",
            run_dir,
            device,
            context.world_size,
            f", resuming at epoch {start_epoch}" if resume else "",
        )

    chunk = torch.empty((config.log_every, len(metric_names)), device=device)  # [log_every, M]
    chunk_first = start_epoch  # first epoch held in `chunk`; a resumed run may start mid-chunk
    start = chunk_start = time.perf_counter()
    for epoch in range(start_epoch, config.num_epochs):
        local_ids = problem.sample_prompt_ids(  # [N]
            config.sample_batch_size, prompt_sampler, rank=context.rank, world_size=context.world_size
        )
        local_samples = policy.sample(local_ids, sampler)  # [N]
        local_rewards = problem.rewards(local_ids, local_samples)  # [N]
        local_advantages = tracker.update(local_ids, local_rewards)  # [N]
        # Every rank applies the global batch ([world_size * N]), in rank order.
        prompt_ids, samples, rewards, advantages = context.all_gather(
            local_ids, local_samples, local_rewards, local_advantages
        )
        policy.update(prompt_ids, samples, advantages, learning_rate=config.learning_rate)

        last = epoch == config.num_epochs - 1
        if context.is_main:
            fallback = fallback_mask(tracker, prompt_ids)  # which samples fell back
            if recorder is not None:
                recorder.record(epoch, prompt_ids, rewards)
            reward_std, reward_mean = torch.std_mean(rewards, correction=0)
            row = epoch - chunk_first
            chunk[row] = torch.cat(
                (
                    torch.stack((reward_mean, reward_std, fallback.float().mean())),
                    problem.metrics(policy, prompt_ids, rewards),
                )
            )
            if (epoch + 1) % config.log_every == 0 or last:
                rows = chunk[: row + 1].tolist()  # the one host sync per chunk
                metrics.append(chunk_first, rows)
                chunk_first = epoch + 1
                now = time.perf_counter()
                logger.info(
                    "epoch %5d/%d  reward %8.2f +- %6.2f  fallback %.2f%s  %7.0f epochs/s",
                    epoch + 1,
                    config.num_epochs,
                    rows[-1][0],
                    rows[-1][1],
                    rows[-1][2],
                    "".join(f"  {name} {value:.3f}" for name, value in zip(problem.metric_names, rows[-1][3:])),
                    (row + 1) / (now - chunk_start),
                )
                chunk_start = now
        if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
            if recorder is not None:
                recorder.flush()
            _save(run_dir, epoch + 1, policy, tracker, sampler, prompt_sampler, context)
            if context.is_main:
                _write_text(
                    os.path.join(run_dir, TRAIN_TIME_FILE),
                    json.dumps(
                        {
                            "epoch": epoch + 1,
                            "train_seconds": elapsed + time.perf_counter() - start,
                            "timed_from": timed_from,
                        }
                    )
                    + "\n",
                )
    loop_seconds = time.perf_counter() - start

    summary = None
    if context.is_main:
        finals, overall, final_epochs = metrics.means()
        final_reward = finals["reward_mean"]
        train_seconds = elapsed + loop_seconds
        summary = {
            "final_reward": final_reward,
            "final_reward_epochs": final_epochs,
            **{f"final_{name}": finals[name] for name in problem.metric_names},
            **{f"mean_{name}": overall[name] for name in problem.metric_names},
            "problem": problems.problem_name(config),
            "method": config.stat_tracking.method,
            "seed": config.seed,
            "num_epochs": config.num_epochs,
            "world_size": context.world_size,
            "train_seconds": train_seconds,
            "timed_epochs": config.num_epochs - timed_from,
            "epochs_per_second": (config.num_epochs - timed_from) / max(train_seconds, 1e-9),
            "resumed_at_epoch": start_epoch,
            "device": str(device),
            "run_dir": run_dir,
        }
        _write_json(os.path.join(run_dir, "summary.json"), summary)
        logger.info(
            "final_reward %.2f (mean of the last %d epochs), loop %.3f s", final_reward, final_epochs, train_seconds
        )
    return context.broadcast_object(summary)


def _write_text(path: str, text: str) -> None:
    """Writes a file atomically: a temporary file, then a rename over ``path``."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _agree(
    context: distributed.DistributedContext, failure: Optional[Exception], what: str, *, main_only: bool = False
) -> None:
    """Raises on every rank if ``failure`` happened on any (one small collective), else returns.

    Args:
        context: the job.
        failure: this rank's ConfigError or CheckpointError, or None.
        what: the step, for the message.
        main_only: only rank 0 ran the step; the others pass None.

    Raises:
        ConfigError or checkpointing.CheckpointError: the failure's type and
            message, on every rank, with the failing ranks named when there
            are several processes.
    """
    outcome = None if failure is None else (type(failure).__name__, str(failure))
    outcomes = (
        [outcome]
        if context.world_size == 1
        else ([context.broadcast_object(outcome)] if main_only else context.gather_objects(outcome))
    )
    failed = [(rank, result) for rank, result in enumerate(outcomes) if result is not None]
    if not failed:
        return
    kind, message = failed[0][1]
    error_type = ConfigError if kind == "ConfigError" else checkpointing.CheckpointError
    if context.world_size > 1:
        ranks = [0] if main_only else [rank for rank, _ in failed]
        message = f"{message} (while {what}, on rank(s) {ranks} of {context.world_size})"
    if failure is not None and context.world_size == 1:
        raise failure
    raise error_type(message)


def _check_run_config(run_dir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a resume whose config changes what the run computes (see ``check_resume_config``).

    Raises:
        ConfigError: naming the changed field.
        checkpointing.CheckpointError: if the run's config.json cannot be read.
    """
    config_path = os.path.join(run_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise checkpointing.CheckpointError(f"cannot read {config_path}: {error}") from error
    check_resume_config(saved, config)


def _plan_resume(
    run_dir: str,
    config: ml_collections.ConfigDict,
    epoch: int,
    recorded_names: List[str],
    metric_names: Tuple[str, ...] = METRIC_NAMES,
) -> Dict[str, Any]:
    """Checks that a run directory can resume at ``epoch``, and says what to rewrite; writes nothing.

    Args:
        run_dir: the run directory.
        config: the config the resume runs with.
        epoch: the checkpoint's epoch.
        recorded_names: the prompt names the stats log records.
        metric_names: metrics.csv's columns after "epoch".

    Returns:
        ``metrics_rows`` (metrics.csv's header and rows before ``epoch``),
        ``stale_chunks`` (stats chunk files from ``epoch`` on, and partial
        writes, to delete), ``elapsed`` (loop seconds before ``epoch``
        since epoch ``timed_from``, as train_time.json says; 0 and ``epoch``
        where it does not).

    Raises:
        checkpointing.CheckpointError: if metrics.csv or the stats log is
            missing or damaged where the resume needs it; the message names
            the file.
    """
    metrics_rows = _MetricsFile(os.path.join(run_dir, "metrics.csv"), metric_names).rows_before(epoch)
    stale_chunks = _check_stats_log(os.path.join(run_dir, STATS_DIR), epoch, recorded_names, config.stats_log.every > 0)
    elapsed, timed_from = 0.0, epoch
    try:
        with open(os.path.join(run_dir, TRAIN_TIME_FILE), encoding="utf-8") as f:
            timing = json.load(f)
        if timing.get("epoch") == epoch:
            elapsed, timed_from = float(timing["train_seconds"]), int(timing.get("timed_from", 0))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the time before the checkpoint is unknown: the summary times the epochs after it
    return {"metrics_rows": metrics_rows, "stale_chunks": stale_chunks, "elapsed": elapsed, "timed_from": timed_from}


def _check_stats_log(directory: str, epoch: int, recorded_names: List[str], appending: bool) -> List[str]:
    """Checks a run's stats log for a resume at ``epoch``; returns the files to delete.

    Chunks that start at ``epoch`` or later are recomputed, so they are
    deleted whatever their state, with partial writes (``.tmp``). Chunks
    before it must be whole: they cannot be recomputed.

    Raises:
        checkpointing.CheckpointError: naming a chunk before ``epoch`` that
            cannot be read or that spans ``epoch``, or a prompts file that
            records other prompts than the resume would append.
    """
    if not os.path.isdir(directory):
        return []
    stale = []
    for path in sorted(glob.glob(os.path.join(directory, stat_tracking.recording.CHUNK_PATTERN + "*"))):
        name = os.path.basename(path)
        if path.endswith(".tmp"):
            stale.append(path)
            continue
        try:
            first = int(name[len("chunk_") : -len(".npz")])
        except ValueError:
            continue  # not a chunk of the recorder's
        if first >= epoch:
            stale.append(path)
            continue
        try:
            with np.load(path) as data:
                last = int(data["step"][-1])
        except Exception as error:  # np.load raises several types for a damaged file
            raise checkpointing.CheckpointError(
                f"stats chunk {path} cannot be read ({type(error).__name__}: {error}); it holds epochs before the "
                f"checkpoint's epoch {epoch}, which cannot be recomputed. Restore it, or delete {directory} to "
                "resume without the log's past (the log then starts at the checkpoint)"
            ) from error
        if last >= epoch:
            raise checkpointing.CheckpointError(
                f"stats chunk {path} holds epochs {first} to {last}, across the checkpoint's epoch {epoch}; "
                f"delete {directory} to resume without the log's past"
            )
    prompts_path = os.path.join(directory, stat_tracking.recording.PROMPTS_FILE)
    kept = [p for p in glob.glob(os.path.join(directory, stat_tracking.recording.CHUNK_PATTERN)) if p not in stale]
    if appending and kept:
        try:
            with open(prompts_path, encoding="utf-8") as f:
                names = json.load(f)["prompt_names"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise checkpointing.CheckpointError(f"cannot read {prompts_path}: {error}") from error
        if names != list(recorded_names):
            raise checkpointing.CheckpointError(
                f"the stats log in {directory} records other prompts ({prompts_path}) than this run's problem"
            )
    return stale


def _save(
    run_dir: str,
    next_epoch: int,
    policy: Any,
    tracker: stat_tracking.StatTracker,
    sampler: torch.Generator,
    prompt_sampler: torch.Generator,
    context: distributed.DistributedContext,
) -> None:
    """Writes the checkpoint to resume at ``next_epoch`` (rank 0 writes, every rank joins)."""
    # Every rank's sampling generator: rank 0's is also the instance generator.
    generator_states = context.gather_objects(sampler.get_state())
    if not context.is_main:
        return
    state = {
        "epoch": next_epoch,
        "world_size": context.world_size,
        "params": policy.params.cpu(),
        "tracker": {name: tensor.cpu() for name, tensor in tracker.state_dict().items()},
        "generators": generator_states,
    }
    if prompt_sampler is not sampler:  # the ranks' shared prompt generator, alike on every rank
        state["prompt_generator"] = prompt_sampler.get_state()
    checkpointing.save_checkpoint(os.path.join(run_dir, checkpointing.CHECKPOINT_FILE), state)


def _restore(
    checkpoint: Dict[str, Any],
    policy: Any,
    tracker: stat_tracking.StatTracker,
    sampler: torch.Generator,
    prompt_sampler: torch.Generator,
    context: distributed.DistributedContext,
) -> None:
    """Loads a checkpoint's parameters, tracker state and this rank's generator states."""
    where = "checkpoint"
    if checkpoint.get("world_size", 1) != context.world_size:
        raise checkpointing.CheckpointError(
            f"{where} was written by {checkpoint.get('world_size')} process(es); resume with the same number "
            f"(this job has {context.world_size})"
        )
    params = checkpoint["params"]
    if not isinstance(params, torch.Tensor) or params.shape != policy.params.shape:
        raise checkpointing.CheckpointError(
            f"{where} holds parameters of shape {getattr(params, 'shape', None)}, the config needs "
            f"{tuple(policy.params.shape)}: is this the right run and config?"
        )
    try:
        tracker.load_state_dict(checkpoint["tracker"])
    except (TypeError, ValueError) as error:
        raise checkpointing.CheckpointError(f"{where} does not fit this run's tracker: {error}") from error
    if prompt_sampler is not sampler and not isinstance(checkpoint.get("prompt_generator"), torch.Tensor):
        raise checkpointing.CheckpointError(
            f"{where} holds no state of the ranks' shared prompt generator: it was written before the ranks of "
            "this problem drew distinct prompts. Start a new run"
        )
    policy.params.copy_(params)
    sampler.set_state(checkpoint["generators"][context.rank])
    if prompt_sampler is not sampler:
        prompt_sampler.set_state(checkpoint["prompt_generator"])
