"""The training loop on the toy problem: ``train(config, logdir) -> summary``.

``scripts/train.py`` parses flags and calls ``train``; tests call it directly
with tiny configs. Each call writes a new run directory under ``logdir``:

    <logdir>/<YYYYmmdd-HHMMSS>_<method>_seed<seed>[_<n>]/
        config.json   the resolved config
        metrics.csv   one row per epoch: epoch, reward_mean, reward_std,
                      fallback_frac (fraction of samples normalised with
                      whole-batch statistics)
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

from rail_interview import stat_tracking
from rail_interview.toy_problem import make_toy_problem

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


def build_tracker(
    config: ml_collections.ConfigDict, *, num_prompts: int, device: torch.device
) -> stat_tracking.StatTracker:
    """Builds the stat tracker that ``config.method`` names.

    Args:
        config: the ``stat_tracking`` section of the training config.
        num_prompts: P.
        device: where the tracker's state lives.

    Returns:
        The tracker.

    Raises:
        ValueError: for an unknown method.
    """
    common = dict(device=device, check_values=config.check_values)
    if config.method == "batch":
        return stat_tracking.BatchStatTracker(num_prompts, **common)
    if config.method == "buffer":
        return stat_tracking.BufferStatTracker(
            num_prompts, buffer_size=config.buffer_size, min_count=config.min_count, **common
        )
    if config.method == "ema":
        return stat_tracking.EmaStatTracker(
            num_prompts, decay=config.ema_decay, min_count=config.min_count, **common
        )
    raise ValueError(
        f"unknown config.stat_tracking.method {config.method!r}; choose from 'batch', 'buffer', 'ema'"
    )


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


def train(
    config: ml_collections.ConfigDict,
    logdir: str,
    *,
    tracker: Optional[stat_tracking.StatTracker] = None,
) -> Dict[str, Any]:
    """Trains the toy policy with the configured stat tracker.

    Args:
        config: a config as returned by ``configs/default.py:get_config()``.
        logdir: parent directory of the run directory this call creates.
        tracker: a tracker to use instead of the one ``config.stat_tracking``
            describes (a custom implementation, say); it must accept
            ``config.problem.num_prompts`` prompts on the run's device.

    Returns:
        The summary also written to ``summary.json``: ``final_reward`` (mean of
        the batch-mean reward over the last 10 epochs), ``method``, ``seed``,
        ``num_epochs``, ``train_seconds`` (wall-clock of the training loop),
        ``epochs_per_second``, ``device`` and ``run_dir``.

    Raises:
        ValueError: for an invalid config.
    """
    if config.num_epochs < 1 or config.log_every < 1 or config.sample_batch_size < 1:
        raise ValueError("num_epochs, log_every and sample_batch_size must be positive")
    device = resolve_device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    problem, policy = make_toy_problem(
        num_prompts=config.problem.num_prompts,
        num_params=config.problem.num_params,
        generator=generator,
    )
    if tracker is None:
        tracker = build_tracker(config.stat_tracking, num_prompts=problem.num_prompts, device=device)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = create_run_dir(logdir, f"{stamp}_{config.stat_tracking.method}_seed{config.seed}")
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json(indent=2) + "\n")
    metrics_path = os.path.join(run_dir, "metrics.csv")
    with open(metrics_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(("epoch",) + METRIC_NAMES)
    logger.info("Run directory: %s (device %s)", run_dir, device)

    recorder = None
    if config.stats_log.every > 0:
        num_recorded = min(problem.num_prompts, config.stats_log.max_prompts)
        recorder = stat_tracking.PromptStatsRecorder(
            os.path.join(run_dir, STATS_DIR),
            tracker,
            torch.arange(num_recorded),
            prompt_names=problem.prompt_names[:num_recorded],
            every=config.stats_log.every,
            chunk_size=-(-config.log_every // config.stats_log.every),  # flush about as often as metrics
        )

    chunk = torch.empty((config.log_every, len(METRIC_NAMES)), device=device)  # [log_every, M]
    recent_rewards: List[float] = []
    start = chunk_start = time.perf_counter()
    for epoch in range(config.num_epochs):
        prompt_ids = problem.sample_prompt_ids(config.sample_batch_size, generator)  # [N]
        samples = policy.sample(prompt_ids, generator)  # [N]
        rewards = problem.rewards(prompt_ids, samples)  # [N]
        advantages = tracker.update(prompt_ids, rewards)  # [N]
        fallback = tracker.fallback_mask(prompt_ids)  # [N], which samples used batch statistics
        if recorder is not None:
            recorder.record(epoch, prompt_ids, rewards)
        policy.update(prompt_ids, samples, advantages, learning_rate=config.learning_rate)

        reward_std, reward_mean = torch.std_mean(rewards, correction=0)
        row = epoch % config.log_every
        chunk[row] = torch.stack((reward_mean, reward_std, fallback.float().mean()))

        if row == config.log_every - 1 or epoch == config.num_epochs - 1:
            rows = chunk[: row + 1].tolist()  # the one host sync per chunk
            first_epoch = epoch - row
            with open(metrics_path, "a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([first_epoch + i, *values] for i, values in enumerate(rows))
            recent_rewards = (recent_rewards + [values[0] for values in rows])[-FINAL_REWARD_EPOCHS:]
            now = time.perf_counter()
            logger.info(
                "epoch %5d/%d  reward %8.2f +- %6.2f  fallback %.2f  %7.0f epochs/s",
                epoch + 1, config.num_epochs, rows[-1][0], rows[-1][1], rows[-1][2],
                (row + 1) / (now - chunk_start),
            )
            chunk_start = now
    if recorder is not None:
        recorder.flush()
    train_seconds = time.perf_counter() - start

    summary = {
        "final_reward": sum(recent_rewards) / len(recent_rewards),
        "method": config.stat_tracking.method,
        "seed": config.seed,
        "num_epochs": config.num_epochs,
        "train_seconds": train_seconds,
        "epochs_per_second": config.num_epochs / train_seconds,
        "device": str(device),
        "run_dir": run_dir,
    }
    _write_json(os.path.join(run_dir, "summary.json"), summary)
    logger.info("final_reward %.2f (mean of the last %d epochs), loop %.3f s", summary["final_reward"],
                len(recent_rewards), train_seconds)
    return summary
