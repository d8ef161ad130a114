"""The training loop on a toy problem: ``train(config, logdir) -> summary``.

``scripts/train.py`` parses flags and calls ``train``; tests call it directly
with tiny configs. ``train`` is a short loop over named parts: set up the
run (``_set_up``), create or resume its directory (``_open_run``), then per
epoch one ``step``, its metrics (``MetricsLog``) and, every
``config.checkpoint_every`` epochs and at the end, a checkpoint
(``_checkpoint``); last the summary (``_summarise``). ``run_files`` describes
the files a run writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import ml_collections
import torch

from rail_interview import checkpointing, distributed, problems, stat_tracking
from rail_interview.training import run_files
from rail_interview.training.config import (
    ConfigError,
    build_sampler,
    build_tracker,
    method_name,
    resolve_device,
    validate_config,
)
from rail_interview.training.metrics import METRIC_NAMES, MetricsLog, logger
from rail_interview.training.state import TrainingState
from rail_interview.training.step import step


@dataclasses.dataclass
class _Clock:
    """The loop's wall-clock: seconds before this process's first epoch, and since.

    Attributes:
        elapsed: loop seconds before the resume, since epoch ``timed_from``.
        timed_from: the first epoch the run's time covers.
        start: ``time.perf_counter()`` when this process's loop started.
    """

    elapsed: float = 0.0
    timed_from: int = 0
    start: float = 0.0
    end: Optional[float] = None

    def stop(self) -> None:
        """Stops the clock: ``seconds`` counts up to now from here on."""
        self.end = time.perf_counter()

    def seconds(self) -> float:
        """The loop's seconds so far (or up to ``stop``), since epoch ``timed_from``."""
        return self.elapsed + (time.perf_counter() if self.end is None else self.end) - self.start


def _set_up(config: ml_collections.ConfigDict, tracker: Optional[stat_tracking.AdvantageTracker]) -> TrainingState:
    """Checks the config, picks the device, and draws the run's parts from its seed."""
    context = distributed.current_context()
    validate_config(config, world_size=context.world_size)  # every rank raises the same error
    if config.get("num_threads", 0):
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
    if tracker is None:
        tracker = build_tracker(
            config.stat_tracking,
            num_prompts=config.problem.num_prompts,
            device=device,
            process_group=context.group,
            track_streaks=config.get("prompt_sampler", {}).get("rule", "none") == "greso",
        )
    elif context.world_size > 1 and tracker.process_group is None:
        raise ValueError("under torchrun, a tracker passed to train() needs process_group= so that ranks agree")
    if device.type == "cuda":
        # index_add_ (the policy update, the EMA tracker) uses float atomics on
        # CUDA, whose rounding varies from run to run; deterministic algorithms
        # keep runs reproducible and ranks' parameters identical.
        torch.use_deterministic_algorithms(True, warn_only=True)
    sampler = build_sampler(config, device=device)
    return TrainingState.create(config, tracker, device=device, context=context, sampler=sampler)


def _resume(
    config: ml_collections.ConfigDict, run_dir: str, state: TrainingState
) -> Tuple[int, Optional[run_files.ResumePlan]]:
    """Checks a resume in three rounds that every rank agrees on, restores the state, and writes nothing.

    Returns:
        The checkpoint's epoch, and on rank 0 the plan of what to rewrite
        (``run_files.plan_resume``; None on other ranks).
    """
    context = state.context
    failure = None
    if context.is_main:  # First the config: may this resume change what it changes?
        try:
            run_files.check_run_config(run_dir, config)
        except (checkpointing.CheckpointError, ConfigError) as error:
            failure = error
    run_files.agree(context, failure, "checking the config", main_only=True)
    # Every rank loads the checkpoint; all of them agree on the outcome
    # before anything is written, so that no rank waits for a failed one.
    failure, epoch = None, 0
    try:
        checkpoint = checkpointing.load_checkpoint(
            os.path.join(run_dir, checkpointing.CHECKPOINT_FILE), ["epoch", "params", "tracker", "generators"]
        )
        epoch = checkpoint["epoch"]
        if epoch > config.num_epochs:
            raise checkpointing.CheckpointError(
                f"the checkpoint is at epoch {epoch}, past config.num_epochs = {config.num_epochs}: "
                "resume with a num_epochs at least that large"
            )
        state.restore(checkpoint)
    except (checkpointing.CheckpointError, ConfigError) as error:
        failure = error
    run_files.agree(context, failure, "loading the checkpoint")
    plan, failure = None, None
    if context.is_main:  # Rank 0 checks the run directory (metrics, stats log), still writing nothing.
        try:
            num_recorded = min(state.problem.num_prompts, config.stats_log.max_prompts)
            names = METRIC_NAMES + tuple(state.problem.metric_names)
            plan = run_files.plan_resume(run_dir, config, epoch, state.problem.prompt_names[:num_recorded], names)
        except (checkpointing.CheckpointError, ConfigError) as error:
            failure = error
    run_files.agree(context, failure, "checking the run directory", main_only=True)
    return epoch, plan


def _open_run(
    config: ml_collections.ConfigDict, logdir: str, state: TrainingState, resume: bool
) -> Tuple[str, int, _Clock, Optional[MetricsLog]]:
    """Creates the run directory, or checks and rewrites it for a resume.

    Returns:
        The run directory, the first epoch to run, the clock, and rank 0's
        ``MetricsLog`` (None on other ranks).
    """
    context = state.context
    run_dir, start_epoch, plan = logdir, 0, None
    if resume:
        start_epoch, plan = _resume(config, run_dir, state)
    elif context.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = run_files.create_run_dir(logdir, f"{stamp}_{method_name(config.stat_tracking)}_seed{config.seed}")
    run_dir = context.broadcast_object(run_dir)
    timing = (plan.elapsed, plan.timed_from) if plan is not None else (0.0, 0)
    clock = _Clock(*context.broadcast_object(timing))
    log = None
    if context.is_main:
        if resume:  # all checked: now write, each file atomically
            for path in plan.stale_chunks:
                os.remove(path)
        run_files.write_text(os.path.join(run_dir, "config.json"), config.to_json(indent=2) + "\n")
        log = MetricsLog(
            run_dir, state, config, first_epoch=start_epoch, resume_rows=plan.metrics_rows if resume else None
        )
        logger.info(
            "Run directory: %s (device %s, %d process(es)%s), tracker %r",
            run_dir,
            state.policy.params.device,
            context.world_size,
            f", resuming at epoch {start_epoch}" if resume else "",
            state.tracker,
        )
    return run_dir, start_epoch, clock, log


def _checkpoint(run_dir: str, state: TrainingState, log: Optional[MetricsLog], next_epoch: int, clock: _Clock) -> None:
    """Writes the stats log's chunk, the checkpoint (rank 0 writes, every rank joins) and train_time.json."""
    if log is not None:
        log.flush()
    payload = state.gather_checkpoint(next_epoch)
    if payload is None:
        return
    checkpointing.save_checkpoint(os.path.join(run_dir, checkpointing.CHECKPOINT_FILE), payload)
    timing = {"epoch": next_epoch, "train_seconds": clock.seconds(), "timed_from": clock.timed_from}
    run_files.write_text(os.path.join(run_dir, run_files.TRAIN_TIME_FILE), json.dumps(timing) + "\n")


def _summarise(
    config: ml_collections.ConfigDict,
    run_dir: str,
    state: TrainingState,
    log: MetricsLog,
    start_epoch: int,
    clock: _Clock,
) -> Dict[str, Any]:
    """Writes and returns summary.json (see ``train``'s Returns)."""
    finals, overall, final_epochs = log.file.means()
    train_seconds, timed_epochs = clock.seconds(), config.num_epochs - clock.timed_from
    summary = {
        "final_reward": finals["reward_mean"],
        "final_reward_epochs": final_epochs,
        **{f"final_{name}": finals[name] for name in log.problem_metrics},
        **{f"mean_{name}": overall[name] for name in log.problem_metrics},
        "problem": problems.problem_name(config),
        "method": config.stat_tracking.method,
        "seed": config.seed,
        "num_epochs": config.num_epochs,
        "world_size": state.context.world_size,
        "train_seconds": train_seconds,
        "timed_epochs": timed_epochs,
        "epochs_per_second": timed_epochs / max(train_seconds, 1e-9),
        "resumed_at_epoch": start_epoch,
        "device": str(state.policy.params.device),
        "run_dir": run_dir,
    }
    run_files.write_json(os.path.join(run_dir, "summary.json"), summary)
    logger.info(
        "final_reward %.2f (mean of the last %d epochs), loop %.3f s",
        finals["reward_mean"],
        final_epochs,
        train_seconds,
    )
    return summary


def train(
    config: ml_collections.ConfigDict,
    logdir: str,
    *,
    tracker: Optional[stat_tracking.AdvantageTracker] = None,
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
        ``method``, ``seed``, ``num_epochs``, ``world_size``,
        ``train_seconds`` (wall-clock of the training loop over
        ``timed_epochs`` epochs: every epoch of the run, the ones before a
        resume included, unless the run directory lost its
        train_time.json), ``epochs_per_second``, ``resumed_at_epoch`` (0 for
        a run that started here), ``device`` and ``run_dir``.

    Raises:
        ConfigError: for an invalid config, or a resume that changes a field
            it may not (every rank raises it).
        checkpointing.CheckpointError: if ``resume`` finds no usable
            checkpoint on some rank, or a damaged metrics.csv or stats log
            (every rank raises it; nothing was written).
    """
    state = _set_up(config, tracker)
    run_dir, start_epoch, clock, log = _open_run(config, logdir, state, resume)
    clock.start = time.perf_counter()
    if log is not None:
        log.start(clock.start)
    for epoch in range(start_epoch, config.num_epochs):
        batch = step(state, batch_size=config.sample_batch_size, learning_rate=config.learning_rate)
        if log is not None:
            log.record(epoch, batch)
        last = epoch == config.num_epochs - 1
        if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
            _checkpoint(run_dir, state, log, epoch + 1, clock)
    clock.stop()
    summary = _summarise(config, run_dir, state, log, start_epoch, clock) if log is not None else None
    return state.context.broadcast_object(summary)
