"""A run directory's files: created once, checked and rewritten on resume, written atomically.

    <logdir>/<YYYYmmdd-HHMMSS>_<method>[+<memory>]_seed<seed>[_<n>]/
        config.json      the resolved config
        metrics.csv      one row per epoch (``MetricsFile``; columns in ``training.metrics``)
        summary.json     the run's final metrics (``training.loop.train``)
        stats/           per-prompt tracker statistics (``stat_tracking.recording``)
        checkpoint.pt    the state to resume from (``TrainingState.gather_checkpoint``)
        train_time.json  loop seconds up to the checkpoint, so that a resumed
                         run's summary times the whole run

A resume is a transaction (``plan_resume``): everything it needs (the
config's compatibility, the checkpoint on every rank, metrics.csv and the
stats log) is checked before anything is written, and every rank ends with
the same error if any check fails (``agree``); then the files are
rewritten, each atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from rail_interview import checkpointing, distributed
from rail_interview.stat_tracking import recording
from rail_interview.training.config import ConfigError, check_resume_config

#: Subdirectory of a run that holds the per-prompt stats log.
STATS_DIR = "stats"

#: Loop seconds up to the latest checkpoint, beside it in the run directory.
TRAIN_TIME_FILE = "train_time.json"

#: final_reward averages the batch-mean reward over this many last epochs (all of them in a shorter run).
FINAL_REWARD_EPOCHS = 10


def write_text(path: str, text: str) -> None:
    """Writes a file atomically: a temporary file, then a rename over ``path``.

    Args:
        path: the file.
        text: its new contents.
    """
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON, atomically.

    Args:
        path: the file.
        payload: a JSON-serialisable dict.
    """
    write_text(path, json.dumps(payload, indent=2) + "\n")


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


class MetricsFile:
    """metrics.csv of a run: appended to in chunks, truncated when a run resumes.

    Args:
        path: the file.
        names: the columns after "epoch".
    """

    def __init__(self, path: str, names: Sequence[str]) -> None:
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
            if not _whole_row(row, expected, len(header)):
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


def _whole_row(row: List[str], epoch: int, width: int) -> bool:
    """Whether a metrics.csv row is the whole row of ``epoch``: ``width`` fields, the epoch, then numbers."""
    try:
        return (
            len(row) == width
            and int(row[0]) == epoch
            and all(math.isfinite(float(value)) or value == "nan" for value in row[1:])
        )
    except ValueError:
        return False


def agree(
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


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What a resume rewrites, checked before anything is written.

    Attributes:
        metrics_rows: metrics.csv's header and rows before the checkpoint's epoch.
        stale_chunks: stats chunk files from that epoch on, and partial
            writes, to delete.
        elapsed: loop seconds before the checkpoint since epoch
            ``timed_from``, as train_time.json says (0 where it does not).
        timed_from: the first epoch ``elapsed`` times (the checkpoint's
            epoch where train_time.json says nothing).
    """

    metrics_rows: List[List[str]]
    stale_chunks: List[str]
    elapsed: float
    timed_from: int


def check_run_config(run_dir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a resume whose config changes what the run computes (see ``config.check_resume_config``).

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


def plan_resume(
    run_dir: str, config: ml_collections.ConfigDict, epoch: int, recorded_names: List[str], metric_names: Sequence[str]
) -> ResumePlan:
    """Checks that a run directory can resume at ``epoch``, and says what to rewrite; writes nothing.

    Args:
        run_dir: the run directory.
        config: the config the resume runs with.
        epoch: the checkpoint's epoch.
        recorded_names: the prompt names the stats log records.
        metric_names: metrics.csv's columns after "epoch".

    Returns:
        The plan.

    Raises:
        checkpointing.CheckpointError: if metrics.csv or the stats log is
            missing or damaged where the resume needs it; the message names
            the file.
    """
    metrics_rows = MetricsFile(os.path.join(run_dir, "metrics.csv"), metric_names).rows_before(epoch)
    stale_chunks = check_stats_log(os.path.join(run_dir, STATS_DIR), epoch, recorded_names, config.stats_log.every > 0)
    elapsed, timed_from = 0.0, epoch
    try:
        with open(os.path.join(run_dir, TRAIN_TIME_FILE), encoding="utf-8") as f:
            timing = json.load(f)
        if timing.get("epoch") == epoch:
            elapsed, timed_from = float(timing["train_seconds"]), int(timing.get("timed_from", 0))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the time before the checkpoint is unknown: the summary times the epochs after it
    return ResumePlan(metrics_rows, stale_chunks, elapsed, timed_from)


def check_stats_log(directory: str, epoch: int, recorded_names: List[str], appending: bool) -> List[str]:
    """Checks a run's stats log for a resume at ``epoch``; returns the files to delete.

    Chunks that start at ``epoch`` or later are recomputed, so they are
    deleted whatever their state, with partial writes (``.tmp``). Chunks
    before it must be whole: they cannot be recomputed.

    Args:
        directory: the run's stats directory.
        epoch: the checkpoint's epoch.
        recorded_names: the prompt names the resume would record.
        appending: whether the resume appends to the log.

    Returns:
        The paths to delete.

    Raises:
        checkpointing.CheckpointError: naming a chunk before ``epoch`` that
            cannot be read or that spans ``epoch``, or a prompts file that
            records other prompts than the resume would append.
    """
    if not os.path.isdir(directory):
        return []
    stale = []
    for path in sorted(glob.glob(os.path.join(directory, recording.CHUNK_PATTERN + "*"))):
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
        _check_chunk_before(path, directory, epoch, first)
    kept = [p for p in glob.glob(os.path.join(directory, recording.CHUNK_PATTERN)) if p not in stale]
    if appending and kept:
        prompts_path = os.path.join(directory, recording.PROMPTS_FILE)
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


def _check_chunk_before(path: str, directory: str, epoch: int, first: int) -> None:
    """Checks that a stats chunk starting before ``epoch`` is readable and ends before it."""
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
