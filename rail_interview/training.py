"""The training loop on the toy problem: ``train(config, logdir) -> summary``.

``scripts/train.py`` parses flags and calls ``train``; tests call it directly
with tiny configs. Each call writes a new run directory under ``logdir``:

    <logdir>/<YYYYmmdd-HHMMSS>_<method>[+<memory>]_seed<seed>[_<n>]/
        config.json   the resolved config
        metrics.csv   one row per epoch: epoch, reward_mean, reward_std,
                      fallback_frac (fraction of samples whose prompt had
                      fewer than min_count rewards: normalised with
                      whole-batch statistics, or for the GRPO family without
                      memory, given config.stat_tracking.fallback)
        summary.json  final_reward, method, seed, train_seconds, ...
        stats/        per-prompt tracker statistics, every
                      ``config.stats_log.every`` epochs (see
                      ``rail_interview.stat_tracking.recording``)

Per-epoch metrics stay on the device and are read back every
``config.log_every`` epochs, so the loop syncs with the host once per chunk,
not once per epoch.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import ml_collections
import torch

from rail_interview import checkpointing, configs, distributed, stat_tracking
from rail_interview.toy_problem import GaussianPolicy, make_toy_problem

logger = logging.getLogger(__name__)

#: Columns of metrics.csv after "epoch", in the order of the metrics tensor.
METRIC_NAMES = ("reward_mean", "reward_std", "fallback_frac")

#: Subdirectory of a run that holds the per-prompt stats log.
STATS_DIR = "stats"

#: final_reward averages the batch-mean reward over this many last epochs.
FINAL_REWARD_EPOCHS = 10


def resolve_device(name: str) -> torch.device:
    """Turns the config's device name into a torch device.

    Args:
        name: "auto" (CUDA when available, else CPU), "cpu" or "cuda".

    Returns:
        The device.

    Raises:
        ValueError: for another name, or "cuda" without a GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"config.device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config.device is 'cuda' but torch sees no CUDA device")
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
        ValueError: for an unknown method, memory or fallback, or a memory
            other than "none" with a method that is not of the GRPO family.
    """
    common = dict(device=device, check_values=config.check_values, process_group=process_group)
    memory = config.get("memory", "none")
    if memory not in MEMORIES:
        raise ValueError(f"unknown config.stat_tracking.memory {memory!r}; choose from "
                         f"{', '.join(map(repr, MEMORIES))}")
    if config.method not in METHODS:
        raise ValueError(f"unknown config.stat_tracking.method {config.method!r}; choose from "
                         f"{', '.join(map(repr, METHODS))}")
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
            raise ValueError(f"unknown config.stat_tracking.fallback {fallback!r}; choose from "
                             f"{', '.join(map(repr, FALLBACKS))}")
        return getattr(stat_tracking.presets, preset)(num_prompts, fallback=fallback, **options, **common)
    if memory != "none":
        raise ValueError(
            f"config.stat_tracking.memory={memory!r} applies to the GRPO family "
            f"({', '.join(map(repr, GRPO_FAMILY))}); method {config.method!r} has its own: leave memory 'none'"
        )
    if config.method == "batch":
        return stat_tracking.BatchStatTracker(num_prompts, **common)
    if config.method == "buffer":
        return stat_tracking.BufferStatTracker(
            num_prompts, buffer_size=config.buffer_size, min_count=config.min_count, **common
        )
    return stat_tracking.EmaStatTracker(
        num_prompts, decay=config.ema_decay, min_count=config.min_count, **common
    )


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
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


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
        config = ml_collections.ConfigDict(json.load(f))
    return configs.apply_overrides(config, overrides or {})


def _sampling_generator(config: ml_collections.ConfigDict, generator: torch.Generator,
                        context: distributed.DistributedContext) -> torch.Generator:
    """The generator a rank samples prompts and answers with.

    Rank 0 keeps drawing from the instance's generator, so a single process
    runs exactly as it always has; rank r > 0 gets its own seed, derived from
    the run's seed, so that ranks draw different samples.
    """
    if context.rank == 0:
        return generator
    seeds = torch.randint(2**62, (context.world_size,), generator=torch.Generator().manual_seed(config.seed))
    return torch.Generator(device=generator.device).manual_seed(int(seeds[context.rank]))


class _MetricsFile:
    """metrics.csv of a run: appended to in chunks, truncated when a run resumes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self) -> None:
        """Writes a new file holding only the header row."""
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(("epoch",) + METRIC_NAMES)

    def append(self, first_epoch: int, rows: List[List[float]]) -> None:
        """Appends rows for epochs ``first_epoch``, ``first_epoch + 1``, ..."""
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([first_epoch + i, *values] for i, values in enumerate(rows))

    def truncate(self, epoch: int) -> None:
        """Drops the rows of ``epoch`` and later (written after the checkpoint a run resumes from)."""
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) < epoch]
        temporary = self.path + ".tmp"
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(kept)
        os.replace(temporary, self.path)

    def final_reward(self) -> float:
        """Mean batch-mean reward over the last ``FINAL_REWARD_EPOCHS`` rows."""
        with open(self.path, newline="", encoding="utf-8") as f:
            rewards = [float(row["reward_mean"]) for row in csv.DictReader(f)][-FINAL_REWARD_EPOCHS:]
        return sum(rewards) / len(rewards)


def _validate(config: ml_collections.ConfigDict) -> None:
    for name in ("num_epochs", "log_every", "sample_batch_size"):
        if config[name] < 1:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    if config.checkpoint_every < 0 or config.checkpoint_every % config.log_every:
        raise ValueError(
            f"config.checkpoint_every ({config.checkpoint_every}) must be 0 or a multiple of config.log_every "
            f"({config.log_every}), so that checkpoints fall where metrics are written"
        )


def train(
    config: ml_collections.ConfigDict,
    logdir: str,
    *,
    tracker: Optional[stat_tracking.StatTracker] = None,
    resume: bool = False,
) -> Dict[str, Any]:
    """Trains the toy policy with the configured stat tracker.

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
        the batch-mean reward over the last 10 epochs), ``method``, ``seed``,
        ``num_epochs``, ``world_size``, ``train_seconds`` (wall-clock of this
        call's training loop), ``epochs_per_second``, ``device`` and
        ``run_dir``.

    Raises:
        ValueError: for an invalid config.
        checkpointing.CheckpointError: if ``resume`` finds no usable checkpoint.
    """
    _validate(config)
    context = distributed.current_context()
    device = resolve_device(config.device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    problem, policy = make_toy_problem(
        num_prompts=config.problem.num_prompts,
        num_params=config.problem.num_params,
        generator=generator,
    )
    sampler = _sampling_generator(config, generator, context)
    if tracker is None:
        tracker = build_tracker(config.stat_tracking, num_prompts=problem.num_prompts, device=device,
                                process_group=context.group)
    elif context.world_size > 1 and tracker.process_group is None:
        raise ValueError("under torchrun, a tracker passed to train() needs process_group= so that ranks agree")
    if device.type == "cuda":
        # index_add_ (the policy update, the EMA tracker) uses float atomics on
        # CUDA, whose rounding varies from run to run; deterministic algorithms
        # keep runs reproducible and ranks' parameters identical.
        torch.use_deterministic_algorithms(True, warn_only=True)

    start_epoch = 0
    if resume:
        run_dir = logdir
        checkpoint = checkpointing.load_checkpoint(
            os.path.join(run_dir, checkpointing.CHECKPOINT_FILE), ["epoch", "params", "tracker", "generators"]
        )
        _restore(checkpoint, policy, tracker, sampler, context)
        start_epoch = checkpoint["epoch"]
        if start_epoch > config.num_epochs:
            raise checkpointing.CheckpointError(
                f"the checkpoint is at epoch {start_epoch}, past config.num_epochs = {config.num_epochs}: "
                "resume with a num_epochs at least that large"
            )
    elif context.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = create_run_dir(logdir, f"{stamp}_{method_name(config.stat_tracking)}_seed{config.seed}")
    else:
        run_dir = ""
    run_dir = context.broadcast_object(run_dir)

    metrics = _MetricsFile(os.path.join(run_dir, "metrics.csv"))
    recorder = None
    if context.is_main:
        stats_dir = os.path.join(run_dir, STATS_DIR)
        if resume and os.path.isdir(stats_dir):  # first: the one step here that can refuse
            stat_tracking.truncate_prompt_stats(stats_dir, start_epoch)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2) + "\n")
        if resume:
            metrics.truncate(start_epoch)
        else:
            metrics.create()
        if config.stats_log.every > 0:
            num_recorded = min(problem.num_prompts, config.stats_log.max_prompts)
            recorder = stat_tracking.PromptStatsRecorder(
                stats_dir,
                tracker,
                torch.arange(num_recorded),
                prompt_names=problem.prompt_names[:num_recorded],
                every=config.stats_log.every,
                chunk_size=-(-config.log_every // config.stats_log.every),  # flush about as often as metrics
                append=resume,
            )
        logger.info("Run directory: %s (device %s, %d process(es)%s)", run_dir, device, context.world_size,
                    f", resuming at epoch {start_epoch}" if resume else "")

    chunk = torch.empty((config.log_every, len(METRIC_NAMES)), device=device)  # [log_every, M]
    chunk_first = start_epoch  # first epoch held in `chunk`; a resumed run may start mid-chunk
    start = chunk_start = time.perf_counter()
    for epoch in range(start_epoch, config.num_epochs):
        local_ids = problem.sample_prompt_ids(config.sample_batch_size, sampler)  # [N]
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
            chunk[row] = torch.stack((reward_mean, reward_std, fallback.float().mean()))
            if (epoch + 1) % config.log_every == 0 or last:
                rows = chunk[: row + 1].tolist()  # the one host sync per chunk
                metrics.append(chunk_first, rows)
                chunk_first = epoch + 1
                now = time.perf_counter()
                logger.info(
                    "epoch %5d/%d  reward %8.2f +- %6.2f  fallback %.2f  %7.0f epochs/s",
                    epoch + 1, config.num_epochs, rows[-1][0], rows[-1][1], rows[-1][2],
                    (row + 1) / (now - chunk_start),
                )
                chunk_start = now
        if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
            if recorder is not None:
                recorder.flush()
            _save(run_dir, epoch + 1, policy, tracker, sampler, context)
    train_seconds = time.perf_counter() - start

    summary = None
    if context.is_main:
        summary = {
            "final_reward": metrics.final_reward(),
            "method": config.stat_tracking.method,
            "seed": config.seed,
            "num_epochs": config.num_epochs,
            "world_size": context.world_size,
            "train_seconds": train_seconds,
            "epochs_per_second": (config.num_epochs - start_epoch) / max(train_seconds, 1e-9),
            "device": str(device),
            "run_dir": run_dir,
        }
        _write_json(os.path.join(run_dir, "summary.json"), summary)
        logger.info("final_reward %.2f (mean of the last %d epochs), loop %.3f s", summary["final_reward"],
                    FINAL_REWARD_EPOCHS, train_seconds)
    return context.broadcast_object(summary)


def _save(run_dir: str, next_epoch: int, policy: GaussianPolicy, tracker: stat_tracking.StatTracker,
          sampler: torch.Generator, context: distributed.DistributedContext) -> None:
    """Writes the checkpoint to resume at ``next_epoch`` (rank 0 writes, every rank joins)."""
    # Every rank's sampling generator: rank 0's is also the instance generator.
    generator_states = context.gather_objects(sampler.get_state())
    if not context.is_main:
        return
    checkpointing.save_checkpoint(
        os.path.join(run_dir, checkpointing.CHECKPOINT_FILE),
        {
            "epoch": next_epoch,
            "world_size": context.world_size,
            "params": policy.params.cpu(),
            "tracker": {name: tensor.cpu() for name, tensor in tracker.state_dict().items()},
            "generators": generator_states,
        },
    )


def _restore(checkpoint: Dict[str, Any], policy: GaussianPolicy, tracker: stat_tracking.StatTracker,
             sampler: torch.Generator, context: distributed.DistributedContext) -> None:
    """Loads a checkpoint's parameters, tracker state and this rank's generator state."""
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
    policy.params.copy_(params)
    sampler.set_state(checkpoint["generators"][context.rank])
