"""Per-epoch metrics of a run: computed on the device, written to metrics.csv a chunk at a time.

metrics.csv has one row per epoch: ``epoch``, then ``METRIC_NAMES``
(every problem's), then the problem's own ``metric_names`` (the pass/fail
problem's ``pass_rate`` and ``zero_variance_frac``):

* ``reward_mean``, ``reward_std``: the global batch's rewards (population std);
* ``fallback_frac``: the share of samples whose prompt had fewer than
  ``min_count`` rewards: normalised with whole-batch statistics by
  ``buffer`` and ``ema``, given the method's fallback (0, their raw reward,
  or the batch's statistics) by the GRPO family.

``MetricsLog`` keeps each epoch's row on the device and reads a chunk back
every ``config.log_every`` epochs, so the loop syncs with the host once per
chunk, not once per epoch; it also feeds the per-prompt stats log.
"""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

import torch

from rail_interview import stat_tracking
from rail_interview.training.run_files import STATS_DIR, MetricsFile
from rail_interview.training.state import TrainingState
from rail_interview.training.step import Batch

logger = logging.getLogger("rail_interview.training")

#: Columns of metrics.csv after "epoch" that every problem has; the problem's ``metric_names`` follow them.
METRIC_NAMES = ("reward_mean", "reward_std", "fallback_frac")


def fallback_mask(tracker: stat_tracking.AdvantageTracker, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Which samples of the batch just updated fell back (their prompt had too few rewards).

    ``tracker.fallback_mask``, except for a tracker without memory that has
    per-prompt statistics (the GRPO family with ``memory="none"``): it
    remembers nothing after the update, so its prompts' counts are their
    samples in this batch, counted here.

    Args:
        tracker: the tracker ``update`` was just called on with ``prompt_ids`` (an
            ``AdvantageTracker``, or any object with ``fallback_mask``).
        prompt_ids: int64 [N], the whole (gathered) batch.

    Returns:
        bool [N].
    """
    if getattr(tracker, "memory", None) == "none" and getattr(tracker, "min_count", 1) > 1:
        counts = torch.zeros(tracker.num_prompts, dtype=torch.int64, device=prompt_ids.device)  # [P]
        counts.index_add_(0, prompt_ids, torch.ones_like(prompt_ids))  # no host sync, unlike bincount
        return counts.index_select(0, prompt_ids) < tracker.min_count
    return tracker.fallback_mask(prompt_ids)


def step_metrics(state: TrainingState, batch: Batch) -> torch.Tensor:
    """One epoch's row of metrics.csv after ``epoch``, on the device.

    Args:
        state: the run, after the step.
        batch: the step's global batch.

    Returns:
        float32 [len(METRIC_NAMES) + len(problem.metric_names)].
    """
    fallback = fallback_mask(state.tracker, batch.prompt_ids)  # [W * N]
    reward_std, reward_mean = torch.std_mean(batch.rewards, correction=0)
    return torch.cat(
        (
            torch.stack((reward_mean, reward_std, fallback.float().mean())),
            state.problem.metrics(state.policy, batch.prompt_ids, batch.rewards),
        )
    )


class MetricsLog:
    """Rank 0's writer of metrics.csv and the per-prompt stats log, a chunk at a time.

    Creating one writes metrics.csv: its header alone, or on resume the rows
    before the checkpoint (``resume_rows``); then the stats log is opened.

    Args:
        run_dir: the run directory.
        state: the run.
        config: the training config (``log_every``, ``num_epochs``, ``stats_log``).
        first_epoch: the first epoch this process records (the checkpoint's on resume).
        resume_rows: on resume, metrics.csv's header and rows before
            ``first_epoch`` (the stats log is then appended to); None for a
            new run.
    """

    def __init__(
        self,
        run_dir: str,
        state: TrainingState,
        config,
        *,
        first_epoch: int,
        resume_rows: Optional[List[List[str]]] = None,
    ) -> None:
        self.state = state
        self.problem_metrics = tuple(state.problem.metric_names)
        self.file = MetricsFile(os.path.join(run_dir, "metrics.csv"), METRIC_NAMES + self.problem_metrics)
        if resume_rows is None:
            self.file.create()
        else:
            self.file.rewrite(resume_rows)
        self.log_every, self.num_epochs = config.log_every, config.num_epochs
        self.recorder: Optional[stat_tracking.PromptStatsRecorder] = None
        if config.stats_log.every > 0:
            num_recorded = min(state.problem.num_prompts, config.stats_log.max_prompts)
            self.recorder = stat_tracking.PromptStatsRecorder(
                os.path.join(run_dir, STATS_DIR),
                state.tracker,
                torch.arange(num_recorded),
                prompt_names=state.problem.prompt_names[:num_recorded],
                every=config.stats_log.every,
                chunk_size=-(-config.log_every // config.stats_log.every),  # flush about as often as metrics
                append=resume_rows is not None,
            )
        device = state.policy.params.device
        self.chunk = torch.empty((config.log_every, len(self.file.names)), device=device)  # [log_every, M]
        self.chunk_first = first_epoch  # first epoch held in `chunk`; a resumed run may start mid-chunk
        self.chunk_start = time.perf_counter()  # when the chunk's first epoch started (``start``)

    def start(self, now: float) -> None:
        """Marks the loop's start (``time.perf_counter()``), from which the first progress line's rate counts."""
        self.chunk_start = now

    def record(self, epoch: int, batch: Batch) -> None:
        """Records an epoch's metrics and stats; writes the chunk at its end (the one host sync per chunk)."""
        if self.recorder is not None:
            self.recorder.record(epoch, batch.prompt_ids, batch.rewards)
        row = epoch - self.chunk_first
        self.chunk[row] = step_metrics(self.state, batch)
        if (epoch + 1) % self.log_every == 0 or epoch == self.num_epochs - 1:
            rows = self.chunk[: row + 1].tolist()
            self.file.append(self.chunk_first, rows)
            self.chunk_first = epoch + 1
            now = time.perf_counter()
            logger.info(
                "epoch %5d/%d  reward %8.2f +- %6.2f  fallback %.2f%s  %7.0f epochs/s",
                epoch + 1,
                self.num_epochs,
                rows[-1][0],
                rows[-1][1],
                rows[-1][2],
                "".join(f"  {name} {value:.3f}" for name, value in zip(self.problem_metrics, rows[-1][3:])),
                (row + 1) / (now - self.chunk_start),
            )
            self.chunk_start = now

    def flush(self) -> None:
        """Writes the stats log's pending chunk (before a checkpoint)."""
        if self.recorder is not None:
            self.recorder.flush()
