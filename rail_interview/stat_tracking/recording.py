"""Record a tracker's per-prompt statistics over training, and load them back.

``PromptStatsRecorder`` collects, every ``every`` steps, each recorded
prompt's tracked mean, std, count and fallback flag, and its mean reward in
the step's batch. Per step it only copies the tracker's raw state for the
recorded prompts (``stats_snapshot``) into a buffer on the tracker's device,
with no host sync; once per ``chunk_size`` recorded steps it computes the
statistics of the whole chunk at once and writes them.

On disk, under the recorder's directory:

    prompts.json             {"prompt_ids": [M ints], "prompt_names": [M strings]}
    chunk_<first step>.npz   one file per chunk, NumPy arrays:
        step               int64 [E]     the steps (epochs) recorded
        mean, std          float32 [E, M] tracked statistics after the update
        count              int64 [E, M]   rewards behind them
        fallback           bool [E, M]    True if the prompt used batch statistics
        batch_reward_mean  float32 [E, M] mean reward of the prompt in that
                                           step's batch (NaN if not sampled)
        batch_count        int64 [E, M]   samples of the prompt in that batch

Each chunk is written to a temporary name and renamed, so a run killed midway
leaves only complete chunks, and the log is append-only: nothing written is
rewritten. ``np.load`` reads a chunk without this package;
``load_prompt_stats`` concatenates them.

Dimensions: N samples in a batch, M recorded prompts, E recorded steps.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
import zipfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from rail_interview.stat_tracking.ops import add_at
from rail_interview.stat_tracking.tracker import AdvantageTracker
from rail_interview.stat_tracking.validation import check_positive_int, is_integer_dtype

PROMPTS_FILE = "prompts.json"
CHUNK_PATTERN = "chunk_*.npz"
#: Arrays in every chunk, besides "step".
FIELDS = ("mean", "std", "count", "fallback", "batch_reward_mean", "batch_count")


class PromptStatsRecorder:
    """Collects a tracker's per-prompt statistics on the device, writes them in chunks.

    Call ``record(step, prompt_ids, rewards)`` right after
    ``tracker.update(prompt_ids, rewards)`` every step, and ``flush()`` at the
    end. Only steps that are multiples of ``every`` are recorded.

    Args:
        directory: where prompts.json and the chunks go; created if missing.
            It must not already hold chunks (one log per directory).
        tracker: the tracker whose statistics to record.
        prompt_ids: int64 [M], the prompts to record (on any device). Bound
            M to keep the log small when there are many prompts.
        prompt_names: M names for prompts.json, or None to use the ids.
        every: record one step in this many.
        chunk_size: recorded steps per chunk file (and per host sync).
        append: continue the log already in ``directory`` (when resuming a
            run; see ``truncate_prompt_stats``) instead of refusing it.

    Raises:
        FileExistsError: if ``directory`` already holds chunks and ``append``
            is False.
        ValueError: if ``prompt_ids`` is not 1-D integer, repeats a prompt,
            is out of range or does not match ``prompt_names``, or (with
            ``append``) the existing log records other prompts; or the
            tracker takes several rewards per sample (the log holds one
            reward per prompt and step).

    Example:
        >>> import tempfile
        >>> from rail_interview.stat_tracking import EmaStatTracker
        >>> tracker = EmaStatTracker(num_prompts=3, decay=0.5, min_count=1)
        >>> logdir = tempfile.mkdtemp()
        >>> recorder = PromptStatsRecorder(logdir, tracker, torch.arange(3), chunk_size=2)
        >>> for step in range(3):
        ...     ids, rewards = torch.tensor([0, 2, 2]), torch.tensor([1.0, 2.0, 4.0]) * step
        ...     _ = tracker.update(ids, rewards)
        ...     recorder.record(step, ids, rewards)
        >>> recorder.flush()
        >>> log = load_prompt_stats(logdir)
        >>> log.mean.shape, log.batch_reward_mean[2].tolist()
        ((3, 3), [2.0, nan, 6.0])
    """

    def __init__(
        self,
        directory: str,
        tracker: AdvantageTracker,
        prompt_ids: torch.Tensor,
        *,
        prompt_names: Optional[Sequence[str]] = None,
        every: int = 1,
        chunk_size: int = 100,
        append: bool = False,
    ) -> None:
        check_positive_int("every", every)
        check_positive_int("chunk_size", chunk_size)
        if tracker.num_rewards > 1:
            raise ValueError(
                f"the stats log holds one reward per prompt and step; this tracker takes {tracker.num_rewards} "
                "per sample (num_rewards): log each reward function with its own tracker, or the combined reward"
            )
        if prompt_ids.ndim != 1 or not is_integer_dtype(prompt_ids.dtype):
            raise ValueError(
                f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} of shape {tuple(prompt_ids.shape)}"
            )
        ids = prompt_ids.tolist()
        if len(set(ids)) != len(ids):
            raise ValueError("prompt_ids must not repeat a prompt")
        if ids and (min(ids) < 0 or max(ids) >= tracker.num_prompts):
            raise ValueError(f"prompt_ids must lie in [0, {tracker.num_prompts})")
        names = [str(i) for i in ids] if prompt_names is None else list(prompt_names)
        if len(names) != len(ids):
            raise ValueError(f"got {len(names)} prompt_names for {len(ids)} prompt_ids")
        os.makedirs(directory, exist_ok=True)
        prompts = {"prompt_ids": ids, "prompt_names": names}
        prompts_path = os.path.join(directory, PROMPTS_FILE)
        if glob.glob(os.path.join(directory, CHUNK_PATTERN)):
            if not append:
                raise FileExistsError(f"{directory} already holds a stats log; record into a new directory")
            with open(prompts_path, encoding="utf-8") as f:
                if json.load(f) != prompts:
                    raise ValueError(f"cannot append to the stats log in {directory}: it records other prompts")
        else:
            with open(prompts_path, "w", encoding="utf-8") as f:
                json.dump(prompts, f)

        device = tracker.device
        self.directory = directory
        self.every = every
        self._tracker = tracker
        num_recorded = len(ids)
        recorded = prompt_ids.to(device=device, dtype=torch.int64)  # [M]
        if ids == list(range(tracker.num_prompts)):
            # Every prompt, in order: skip the gathers.
            self._stats_ids: Optional[torch.Tensor] = None
            self._slot_of_prompt: Optional[torch.Tensor] = None
        else:
            self._stats_ids = recorded
            # Column of each of the P prompts among the M recorded ones; M for the others.
            self._slot_of_prompt = torch.full((tracker.num_prompts,), num_recorded, dtype=torch.int64, device=device)
            self._slot_of_prompt[recorded] = torch.arange(num_recorded, device=device)
        # Per recorded step: the tracker's raw stats snapshot (statistics are
        # computed at flush, for the whole chunk at once), and the batch's reward
        # sum and sample count per prompt ([2, M + 1]; the last column collects
        # prompts not recorded).
        self._chunk_size = chunk_size
        self._snapshots: Dict[str, torch.Tensor] = {}  # name -> [chunk_size, M, ...], allocated on first use
        # float32 is exact for counts up to 2**24 samples of one prompt per batch.
        self._batch = torch.zeros((chunk_size, 2, num_recorded + 1), dtype=torch.float32, device=device)
        # [N] ones for the sample counts, reused while N stays.
        self._ones = torch.ones(0, dtype=torch.float32, device=device)  # pragma: no mutate (placeholder)
        self._steps: List[int] = []

    def record(self, step: int, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None:
        """Records the state after this step's update, if ``step % every == 0``.

        A few copies on the device and no host sync, except when the chunk
        is full and gets written.

        Args:
            step: the training step (epoch), a Python int.
            prompt_ids: int64 [N], the batch just passed to ``tracker.update``.
            rewards: float [N], its rewards.
        """
        if step % self.every:
            return
        row = len(self._steps)
        for name, tensor in self._tracker.stats_snapshot(self._stats_ids).items():
            if name not in self._snapshots:
                self._snapshots[name] = torch.empty(
                    (self._chunk_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device
                )
            self._snapshots[name][row].copy_(tensor)
        column = prompt_ids if self._slot_of_prompt is None else self._slot_of_prompt[prompt_ids]  # [N]
        batch = self._batch[row]  # [2, M + 1], zeroed at the last flush
        add_at(batch[0], column, rewards.to(batch.dtype))
        if len(self._ones) != len(column):  # a shape, not a value: no sync
            self._ones = torch.ones(len(column), dtype=batch.dtype, device=batch.device)
        add_at(batch[1], column, self._ones)
        self._steps.append(step)
        if len(self._steps) == self._chunk_size:
            self.flush()

    def flush(self) -> None:
        """Writes the recorded steps not yet written as one chunk file (one host sync)."""
        if not self._steps:
            return
        num_steps = len(self._steps)
        stats = self._tracker.stats_from_snapshot({name: t[:num_steps] for name, t in self._snapshots.items()})
        batch = self._batch[:num_steps, :, :-1].double().cpu().numpy()  # [E, 2, M]
        self._batch.zero_()
        with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN for prompts not sampled
            batch_reward_mean = batch[:, 0] / batch[:, 1]
        arrays = {
            "step": np.asarray(self._steps, dtype=np.int64),
            "mean": stats.mean.cpu().numpy().astype(np.float32),
            "std": stats.std.cpu().numpy().astype(np.float32),
            "count": stats.count.cpu().numpy().astype(np.int64),
            "fallback": stats.fallback.cpu().numpy(),
            "batch_reward_mean": batch_reward_mean.astype(np.float32),
            "batch_count": batch[:, 1].astype(np.int64),
        }
        path = os.path.join(self.directory, f"chunk_{self._steps[0]:09d}.npz")
        temporary = path + ".tmp"
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        self._steps = []


def truncate_prompt_stats(directory: str, step: int) -> None:
    """Deletes the chunks of a stats log that start at or after ``step``.

    Used when a run resumes from a checkpoint taken before ``step``: what was
    logged after the checkpoint is logged again.

    Args:
        directory: the recorder's directory.
        step: the first step to forget.

    Raises:
        ValueError: if a chunk holds steps on both sides of ``step`` (the
            recorder is flushed at every checkpoint, so that never happens
            in training).
    """
    for path in sorted(glob.glob(os.path.join(directory, CHUNK_PATTERN + "*"))):  # in step order
        if path.endswith(".tmp"):
            os.remove(path)
            continue
        first = int(os.path.basename(path)[len("chunk_") : -len(".npz")])
        if first >= step:
            os.remove(path)
            continue
        with np.load(path) as data:
            if data["step"][-1] >= step:
                raise ValueError(f"stats chunk {path} spans step {step}; cannot truncate the log there")


@dataclasses.dataclass
class PromptStatsLog:
    """A stats log loaded by ``load_prompt_stats``.

    Attributes:
        step: int64 [E], the recorded steps, ascending.
        prompt_ids: int64 [M], the recorded prompts.
        prompt_names: their M names.
        mean: float32 [E, M], tracked mean after each step's update.
        std: float32 [E, M], tracked std.
        count: int64 [E, M], rewards behind mean and std.
        fallback: bool [E, M], True where the prompt used batch statistics.
        batch_reward_mean: float32 [E, M], the prompt's mean reward in the
            step's batch, NaN where it was not sampled.
        batch_count: int64 [E, M], its samples in the step's batch.
    """

    step: np.ndarray
    prompt_ids: np.ndarray
    prompt_names: List[str]
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    fallback: np.ndarray
    batch_reward_mean: np.ndarray
    batch_count: np.ndarray


def load_prompt_stats(directory: str) -> PromptStatsLog:
    """Loads every complete chunk of a stats log, in step order.

    A chunk that cannot be read (a run killed while writing, a truncated
    copy) ends the log there, with a warning: everything before it loads.

    Args:
        directory: the recorder's directory (``<run_dir>/stats`` in training).

    Returns:
        The log, concatenated over chunks.

    Raises:
        FileNotFoundError: if the directory or its prompts.json is missing, or
            it holds no readable chunk.
    """
    prompts_path = os.path.join(directory, PROMPTS_FILE)
    if not os.path.isfile(prompts_path):
        raise FileNotFoundError(
            f"no per-prompt stats log in {directory!r} (no {PROMPTS_FILE}); "
            "point at a run directory's stats/ folder written by training"
        )
    with open(prompts_path, encoding="utf-8") as f:
        prompts = json.load(f)
    chunks: List[Dict[str, np.ndarray]] = []
    for path in sorted(glob.glob(os.path.join(directory, CHUNK_PATTERN))):
        try:
            with np.load(path) as data:
                chunk = {name: data[name] for name in ("step",) + FIELDS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"stats log {directory!r}: stopping at unreadable chunk {os.path.basename(path)} ({error})")
            break
        chunks.append(chunk)
    if not chunks:
        raise FileNotFoundError(f"the stats log in {directory!r} holds no complete chunk yet")
    joined = {name: np.concatenate([c[name] for c in chunks]) for name in ("step",) + FIELDS}
    return PromptStatsLog(
        prompt_ids=np.asarray(prompts["prompt_ids"], dtype=np.int64),
        prompt_names=list(prompts["prompt_names"]),
        **joined,
    )
