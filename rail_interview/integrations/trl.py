"""TRL's GRPO and RLOO trainers with a tracker of this package computing their advantages.

``TrackedGRPOTrainer`` and ``TrackedRLOOTrainer`` are TRL's ``GRPOTrainer``
and ``RLOOTrainer`` with one keyword more, ``tracker=``: swap the class
name, pass a tracker with a memory, and each prompt is normalised by its
own past rewards instead of its group alone::

    from accelerate import PartialState

    from rail_interview.integrations.trl import TrackedGRPOTrainer, grpo_tracker

    tracker = grpo_tracker(1024, grpo_config.scale_rewards, memory="buffer", buffer_size=32, min_count=8,
                           device=PartialState().device)
    trainer = TrackedGRPOTrainer(model=..., reward_funcs=..., args=grpo_config, train_dataset=..., tracker=tracker)

Without ``tracker=`` the trainer builds the memoryless tracker that
reproduces its own advantages from its config (``grpo_tracker``,
``rloo_tracker``), so the swap alone changes nothing but the class name.

**Where it hooks in** (TRL 1.16; TRL has no advantage hook, see
huggingface/trl#4525):

* ``_calculate_rewards`` is wrapped to keep ``rewards_per_func``
  ``[B_global, n_funcs]``, already gathered from every process.
* ``_generate_and_score_completions`` runs TRL's own, then replaces
  ``output["advantages"]`` (this process's slice), the advantages TRL logs
  in its completions table, and adds the ``tracker/*`` metrics.
* RLOO with ``beta != 0`` puts a KL penalty into the reward, from log-probs
  computed inside ``_generate_and_score_completions``: the first two calls
  of ``_get_per_token_logps_and_entropies`` there (the policy's, then the
  reference's) are kept, and the penalty is rebuilt with TRL's own
  arithmetic.
* ``_save_checkpoint`` writes the tracker's state into every checkpoint
  directory (``rail_interview_tracker.pt``); ``_load_optimizer_and_scheduler``,
  which ``train(resume_from_checkpoint=...)`` calls, reads it back.

**What the tracker is given.** The reward functions' outputs
``rewards_per_func`` [N, C] as TRL computed them, NaN where a function
returned None, to a tracker that weighs them itself; their weighted sum to
one that does not:

* A tracker with ``num_rewards=C`` (C > 1), or with ``reward_weights`` of
  its own, gets [N, C] (one function: [N]) and combines them with its
  ``reward_weights`` and ``aggregation``, TRL's ``multi_objective_aggregation``:
  ``"sum_then_normalize"`` normalises the weighted ``nansum``;
  ``"normalize_then_sum"`` normalises each function within its group (the
  group's std, whatever ``scale_rewards`` says, as TRL does), sums them
  with the weights and whitens the sums over the batch. With a memory,
  ``normalize_then_sum`` keeps each prompt's statistics per function (state
  [P, C, ...]). The default tracker is this one, with the config's
  ``reward_weights`` and ``multi_objective_aggregation``: the trainer's own
  advantages for either order.
* A tracker with one reward and weight 1 (``grpo_tracker(P, scale_rewards)``,
  any ``AdvantageTracker`` by default) gets the reward TRL's
  ``sum_then_normalize`` normalises: the outputs times ``reward_weights``,
  summed with ``nansum`` (RLOO: clipped to ``reward_clip_range`` and minus
  ``beta`` times the KL). Under ``normalize_then_sum`` with several
  functions that is not the config's estimator, so it is used with a
  warning.

A row where every function returned None is unscorable: it is marked
invalid, so it stays out of memory and of every statistic and gets
advantage 0, as in TRL. TRL's RLOO has no ``multi_objective_aggregation``
(trl 1.16): its tracker takes the one shaped reward.

**Groups.** A tracker without memory groups samples as TRL does: each
``num_generations`` consecutive samples of the gathered batch, whatever
their prompts (``prompt_key`` is not read). A tracker with memory groups
them by prompt key, so a prompt repeated within one generation batch is one
group there, where TRL counts two.

**Keys.** ``prompt_key`` says what identifies a prompt across steps:
``"prompt"`` (default) the dataset's prompt column, text or chat messages
(a list of ``{"role", "content"}`` dicts, keyed by their canonical JSON:
sorted keys, no spaces); ``"prompt_ids"`` the token ids TRL generated from,
hashed on the device with ``token_keys``; any other name: that dataset
column. A column's values are keyed by ``identity_keys``, as the verl
integration keys its columns: integers as they are (ids for a
``keys="ids"`` tracker), anything else by ``prompt_keys`` of its
``canonical_text``. Text and token keys
need a ``keys="hashed"`` tracker. Keys come from the prompt alone: a
multimodal prompt's images are not part of its key.

**Several processes.** TRL gathers the rewards of every process before
normalising; each process keeps its own tracker, without a process group,
updates it with the whole gathered batch (keys are gathered too) and takes
its own slice, so every process's tracker holds the same state. The
checkpoint is written by the process that saves (``args.should_save``) and
read by every process.

**Evaluation** keeps TRL's own advantages and leaves the memory untouched.

**Metrics** added to TRL's logs, each 0 when its denominator is:

* ``tracker/fallback_frac``: the share of the step's valid samples whose
  prompt had fewer than ``min_count`` rewards, so the tracker's fallback set
  their advantage.
* ``tracker/zero_std_frac``: the share of the step's groups (prompts with a
  valid sample) whose valid rewards are all equal: the groups TRL gives 0
  (its ``frac_reward_zero_std`` counts groups whose std is ``isclose`` to 0).
* ``tracker/zero_std_signal_frac``: of those groups, the share that got a
  non-zero advantage from memory: the prompt did not fall back and its
  memory holds rewards older than this batch. Always 0 without memory.

With ``normalize_then_sum`` and per-function statistics, a group counts as
zero-std when every function's rewards in it are equal, and its memory must
hold older rewards of at least one function; the final whitening shifts
every advantage by the batch's mean, so "non-zero" then says little. TRL's
own ``frac_reward_zero_std`` is, for that order, whether the batch's std is
0.

**Refused**, each with a message: a tracker with a process group, one on
another device than the trainer's, one with fewer rows than a generation
batch has prompts, and one whose rewards do not fit the trainer's reward
functions: ``num_rewards`` other than 1 or C, weights for one reward with
several functions, several rewards that refuse NaN (a function's None), and
any tracker that weighs its rewards itself under RLOO. A tracker whose estimator (baseline,
scale, ddof, eps, final normalisation; for one that weighs its rewards,
aggregation and weights) is not the one the config asks for is used, with
a warning.

Tested with trl 1.16.0, transformers 5.10.4 (CI) and 5.24.0 (by hand),
torch 2.13.0 (``tests/test_trl_integration.py``); ``docs/trl.md`` has the
proof and the lines a user changes.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, List, Mapping, Optional, Sequence

import torch
import trl
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import nanstd

from rail_interview.stat_tracking import presets
from rail_interview.stat_tracking.keys import identity_keys, token_keys
from rail_interview.stat_tracking.tracker import AdvantageTracker
from rail_interview.stat_tracking.types import UpdateReport, resolve_device

__all__ = [
    "CHECKPOINT_FILE",
    "TrackedGRPOTrainer",
    "TrackedRLOOTrainer",
    "grpo_tracker",
    "rloo_tracker",
]

#: The file, in each TRL checkpoint directory, that holds the tracker's state.
CHECKPOINT_FILE = "rail_interview_tracker.pt"
_CHECKPOINT_FORMAT = 1


def grpo_tracker(
    num_prompts: int,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    reward_weights: Optional[Sequence[float]] = None,
    *,
    device: Optional[torch.device] = None,
    **options: Any,
) -> AdvantageTracker:
    """A tracker with ``GRPOTrainer``'s estimator for its config, with any memory.

    ``presets.trl_grpo`` with hashed keys: advantage = (r - mean) / (std +
    1e-4), the std chosen by ``scale_rewards`` (``"group"``, ``"batch"``,
    ``"none"``); unscorable samples get 0, and so do prompts below
    ``min_count`` (2 without memory: a group with one scorable sample).
    Without ``memory`` it is the trainer's own estimator, to float32
    rounding (the tests bound it); ``memory="buffer"`` or ``"ema"`` (with
    their options) takes each prompt's statistics from its past rewards too.

    With ``reward_weights`` (C weights, one per reward function) the tracker
    takes the C rewards [N, C] and combines them as
    ``multi_objective_aggregation`` says (see the module docstring); with
    ``"normalize_then_sum"`` a memory keeps each function's statistics. For
    C functions of weight 1 (``GRPOConfig.reward_weights`` None) pass
    ``num_rewards=C`` instead. Without either, the tracker takes one reward:
    the trainer gives it the functions' weighted sum.

    Args:
        num_prompts: rows: the most prompts remembered, and at least the
            distinct prompts of one generation batch.
        scale_rewards: ``GRPOConfig.scale_rewards``.
        multi_objective_aggregation: ``GRPOConfig.multi_objective_aggregation``.
        reward_weights: ``GRPOConfig.reward_weights`` (C floats), or None.
        device: where the tracker lives: the trainer's device (under several
            processes, ``accelerate.PartialState().device``).
        **options: other ``AdvantageTracker`` keywords (``memory``,
            ``buffer_size``, ``decay``, ``min_count``, ``num_rewards``, ...).

    Returns:
        The tracker.

    Example:
        >>> grpo_tracker(1024, "batch", memory="buffer", buffer_size=32, min_count=8).scale
        'batch_std'
        >>> tracker = grpo_tracker(1024, "group", "normalize_then_sum", [1.0, 0.5], memory="buffer", buffer_size=8)
        >>> tracker.num_rewards, tracker.reward_weights, tuple(tracker.state_dict()["rewards"].shape)
        (2, (1.0, 0.5), (1024, 2, 8))
    """
    return presets.trl_grpo(
        num_prompts,
        scale_rewards=scale_rewards,
        multi_objective_aggregation=multi_objective_aggregation,
        reward_weights=reward_weights,
        **{"keys": "hashed", "device": device, **options},
    )


def rloo_tracker(num_prompts: int, *, device: Optional[torch.device] = None, **options: Any) -> AdvantageTracker:
    """A tracker with ``RLOOTrainer``'s leave-one-out estimator, with any memory.

    advantage = r - the mean of the prompt's other scorable rewards (the
    group's, or with a memory also its past ones); unscorable samples, and
    prompts below ``min_count`` (2 without memory: a group with one scorable
    sample), get 0, as TRL's NaN and ``nan_to_num`` give.
    ``normalize_advantages`` is applied after the tracker by
    ``TrackedRLOOTrainer``, as TRL applies it after its baseline.

    Args:
        num_prompts: rows: the most prompts remembered, and at least the
            distinct prompts of one generation batch.
        device: where the tracker lives (see ``grpo_tracker``).
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.

    Example:
        >>> rloo_tracker(1024, memory="ema", decay=0.9, min_count=8).baseline
        'leave_one_out'
    """
    defaults = {"fallback": "zero", "nan_rewards": "invalid", "keys": "hashed", "device": device}
    return presets.verl_rloo(num_prompts, **{**defaults, **options})


class _TrackedAdvantages:
    """What the two trainers share: keys, the tracker's update, logs, metrics and checkpoints.

    A mixin placed before TRL's trainer class; the subclasses say how their
    trainer shapes the reward (``_shape_rewards``), finishes the advantages
    (``_finish_advantages``), which tracker reproduces it
    (``_default_tracker``, ``_expected_tracker``) and which trackers its
    reward functions can feed (``_check_tracker_rewards``).
    """

    tracker: AdvantageTracker

    def __init__(self, *args: Any, tracker: Optional[AdvantageTracker] = None, prompt_key: str = "prompt", **kwargs):
        """Builds TRL's trainer, then checks and keeps the tracker.

        Args:
            *args: TRL's trainer arguments.
            tracker: an ``AdvantageTracker`` on the trainer's device, without
                a process group; None for the trainer's own estimator.
            prompt_key: ``"prompt"``, ``"prompt_ids"`` or a dataset column
                name (see the module docstring).
            **kwargs: TRL's trainer keywords.

        Raises:
            TypeError: if ``tracker`` is not an ``AdvantageTracker``.
            ValueError: for a tracker TRL's batches cannot drive (a process
                group, another device, text keys on a ``keys="ids"``
                tracker, rewards that do not fit the reward functions).
        """
        if tracker is not None and not isinstance(tracker, AdvantageTracker):
            raise TypeError(f"tracker must be an AdvantageTracker of rail_interview, got {type(tracker).__name__}")
        if not isinstance(prompt_key, str) or not prompt_key:
            raise ValueError(f"prompt_key must be 'prompt', 'prompt_ids' or a dataset column name; got {prompt_key!r}")
        super().__init__(*args, **kwargs)
        device = self.accelerator.device
        prompts_per_batch = self.args.generation_batch_size // self.num_generations
        if tracker is None:
            tracker = self._default_tracker(max(1, prompts_per_batch), device)
        _check_tracker(tracker, prompt_key, device, prompts_per_batch)
        self._check_tracker_rewards(tracker)
        self._warn_if_unlike_config(tracker)
        self.tracker = tracker
        self.prompt_key = prompt_key
        self._rewards_per_func: Optional[torch.Tensor] = None

    # What each trainer defines.

    def _default_tracker(self, num_prompts: int, device: torch.device) -> AdvantageTracker:
        """The memoryless tracker that reproduces the trainer's advantages."""
        raise NotImplementedError

    def _expected_tracker(self, tracker: AdvantageTracker) -> AdvantageTracker:
        """The memoryless tracker that would reproduce the config, fed as ``tracker`` is (one row)."""
        return self._default_tracker(1, tracker.device)

    def _check_tracker_rewards(self, tracker: AdvantageTracker) -> None:
        """Refuses a tracker that weighs its rewards itself: this trainer gives it one reward.

        Raises:
            ValueError: if ``tracker`` has several rewards or reward weights.
        """
        if _weighs_rewards(tracker):
            raise ValueError(
                f"the tracker weighs its rewards itself (num_rewards={tracker.num_rewards}, reward_weights="
                f"{tracker.reward_weights}), but {type(self).__name__} gives it one reward per sample, the "
                f"weighted sum of its reward functions; build it with {self._factory_name}(...) and no "
                "num_rewards or reward_weights"
            )

    def _reward_differences(self, tracker: AdvantageTracker) -> List[str]:
        """How the rewards ``tracker`` is given differ from the config's aggregation (none by default)."""
        return []

    def _warn_if_unlike_config(self, tracker: AdvantageTracker) -> None:
        """Warns where a tracker's estimator is not the one the trainer's config asks for.

        The tracker decides the advantages; a difference may be deliberate,
        but a tracker built without passing the config's choice is a likely
        slip, so it is named. Compared: baseline, scale, ddof, eps and the
        final normalisation; for a tracker that weighs its rewards itself,
        its aggregation and weights too.
        """
        expected = self._expected_tracker(tracker)
        names = ["baseline", "scale", "ddof", "eps", "normalize"]
        if tracker.normalize == expected.normalize == "batch":
            names += ["normalize_ddof", "normalize_eps"]
        if _weighs_rewards(tracker):
            names += ["aggregation", "reward_weights"]
        differences = [
            f"{name}={getattr(tracker, name)!r} (the config's: {getattr(expected, name)!r})"
            for name in names
            if getattr(tracker, name) != getattr(expected, name)
        ]
        differences += self._reward_differences(tracker)
        if differences:
            warnings.warn(
                "the tracker's estimator differs from what the trainer's config asks for: "
                f"{', '.join(differences)}; the tracker's is used (build it with {self._factory_name}(...) to follow "
                "the config)",
                stacklevel=3,
            )

    def _shape_rewards(self, rewards: torch.Tensor, output: Mapping[str, Any]) -> torch.Tensor:
        """The trainer's changes to the summed reward before normalising (none by default)."""
        return rewards

    def _finish_advantages(self, report: UpdateReport) -> torch.Tensor:
        """The trainer's changes to the tracker's advantages (none by default)."""
        return report.advantages

    # TRL's override points.

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards, kept for the tracker: float32 [B_global, n_funcs], gathered."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring, with the tracker's advantages in training.

        Evaluation batches return TRL's own output and leave the tracker
        untouched.
        """
        training = self.model.training
        self._rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        if not training:
            return output
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError(
                "TRL did not call _calculate_rewards during _generate_and_score_completions; this TRL version "
                f"({trl.__version__}) is not one rail_interview.integrations.trl supports"
            )
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        counted = None  # bool [N, C]: which rewards a tracker with per-function statistics keeps
        if not _weighs_rewards(self.tracker):
            weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
            rewards = (rewards_per_func * weights).nansum(dim=1)
            rewards[unscorable] = torch.nan
            rewards = self._shape_rewards(rewards, output)
            valid = ~torch.isnan(rewards)
            rewards = torch.where(valid, rewards, 0.0)
        elif rewards_per_func.shape[1] == 1:
            # One function weighed by the tracker: its reward [N], as a sum of one would be.
            valid = ~unscorable
            rewards = torch.where(valid, rewards_per_func[:, 0], 0.0)
        else:
            # [N, C], NaN where a function returned None (the tracker takes NaN as unscorable).
            valid = ~unscorable
            rewards = rewards_per_func
            if self.tracker.aggregation == "normalize_then_sum":
                counted = ~torch.isnan(rewards_per_func)
        if self.tracker.memory == "none":
            # TRL's groups: num_generations consecutive samples, whatever their prompts.
            keys = torch.arange(len(rewards), device=rewards.device) // self.num_generations
        else:
            keys = self._gather_keys(inputs, output)
        report = self.tracker.update_with_report(keys, rewards, valid)
        advantages = self._finish_advantages(report)
        local = len(inputs)
        mine = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)
        output["advantages"] = advantages[mine].to(output["advantages"].dtype)
        self._replace_logged_advantages(advantages)
        self._log_tracker_metrics(keys, report, counted)
        return output

    def _save_checkpoint(self, model, trial):
        """The tracker's state into the checkpoint directory, then TRL's checkpoint.

        Written first, so that the checkpoint is complete when transformers
        pushes it (``push_to_hub``) and rotates old ones; written to a
        temporary file and renamed, so that a crash leaves no partial file.
        """
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            state = {"format": _CHECKPOINT_FORMAT, "tracker": repr(self.tracker), "state": self.tracker.state_dict()}
            path = os.path.join(folder, CHECKPOINT_FILE)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's resume, then the tracker's state from the same checkpoint directory.

        Raises:
            FileNotFoundError: if the checkpoint holds no tracker state and the
                tracker has a memory (it would silently start over).
            ValueError: if the saved state does not fit the tracker (as
                ``AdvantageTracker.load_state_dict``; the tracker is unchanged).
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.exists(path):
            if self.tracker.memory != "none":
                raise FileNotFoundError(
                    f"{path} does not exist: the checkpoint was not written by a Tracked trainer, so the "
                    f"tracker's memory ({self.tracker.memory}) cannot be restored; resume from a checkpoint "
                    "of this trainer, or start a new run"
                )
            return
        saved = torch.load(path, map_location=self.tracker.device, weights_only=True)
        if saved.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} has format {saved.get('format')!r}; this version reads {_CHECKPOINT_FORMAT}")
        if _without_device(saved.get("tracker", "")) != _without_device(repr(self.tracker)):
            warnings.warn(
                f"{path} was saved by {saved.get('tracker')}, and is restored into {self.tracker!r}",
                stacklevel=2,
            )
        self.tracker.load_state_dict(saved["state"])

    # Helpers.

    def _gather_keys(self, inputs: Sequence[Mapping[str, Any]], output: Mapping[str, Any]) -> torch.Tensor:
        """int64 [B_global]: every process's prompt keys, in the order of the gathered rewards."""
        device = self.accelerator.device
        if self.prompt_key == "prompt_ids":
            local = token_keys(output["prompt_ids"], output["prompt_mask"])
        else:
            local = _column_keys(inputs, self.prompt_key, hashed=self.tracker.keys == "hashed", device=device)
        return self.accelerator.gather(local.to(device))

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        """Puts the advantages trained on in TRL's completions table, where TRL put its own."""
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    def _log_tracker_metrics(
        self, keys: torch.Tensor, report: UpdateReport, counted: Optional[torch.Tensor] = None
    ) -> None:
        """Adds what the tracker did this step to TRL's metrics (see the module docstring).

        Args:
            keys: int64 [N], the samples' keys.
            report: the tracker's report of the batch.
            counted: bool [N, C], each reward function's scorable rewards, for a
                tracker with per-function statistics; None otherwise.
        """
        valid = report.valid
        zero_std = report.zero_variance & valid
        signal = zero_std & ~report.fallback & (report.advantages != 0)
        if self.tracker.memory == "none":
            signal = torch.zeros_like(signal)  # the batch is all there is: no signal from the past
        else:
            # A prompt's memory must hold rewards older than this batch's (a buffer no larger than
            # the group holds none), so that float rounding of (r - r) / (0 + eps) is not counted.
            # Per-function statistics: of at least one function.
            kept = valid if counted is None else counted & valid.unsqueeze(-1)  # [N] or [N, C]
            groups = torch.unique(keys, return_inverse=True)[1]
            in_batch = torch.zeros(kept.shape, dtype=torch.long, device=keys.device).index_add_(0, groups, kept.long())
            older = self.tracker.stats(keys).count > in_batch[groups]  # [N] or [N, C]
            signal &= older if counted is None else older.any(-1)
        n_valid, n_fallback = torch.stack([valid.sum(), (report.fallback & valid).sum()]).tolist()
        zero_std_groups, signal_groups, groups_with_valid = (_groups(keys, mask) for mask in (zero_std, signal, valid))
        metrics = self._metrics["train"]
        metrics["tracker/fallback_frac"].append(n_fallback / n_valid if n_valid else 0.0)
        metrics["tracker/zero_std_frac"].append(zero_std_groups / groups_with_valid if groups_with_valid else 0.0)
        metrics["tracker/zero_std_signal_frac"].append(signal_groups / zero_std_groups if zero_std_groups else 0.0)


def _weighs_rewards(tracker: AdvantageTracker) -> bool:
    """Whether a tracker weighs and combines the reward functions itself (several rewards, or weights).

    Such a tracker is given each function's reward; one with a single
    reward of weight 1 is given their weighted sum (the module docstring).
    """
    return tracker.num_rewards > 1 or tracker.reward_weights != (1.0,)


def _without_device(tracker_repr: str) -> str:
    """A tracker's repr without its device, which differs between the processes of one run."""
    return re.sub(r", device=[^,)]*", "", tracker_repr)


def _groups(keys: torch.Tensor, mask: torch.Tensor) -> int:
    """The number of distinct keys among the samples ``mask`` keeps (a host sync, as TRL's metrics are)."""
    return torch.unique(keys[mask]).numel()


def _check_tracker(tracker: AdvantageTracker, prompt_key: str, device: torch.device, prompts_per_batch: int) -> None:
    """Refuses a tracker that TRL's gathered batches cannot drive (see ``_TrackedAdvantages.__init__``)."""
    if tracker.num_prompts < prompts_per_batch:
        raise ValueError(
            f"the tracker has {tracker.num_prompts} rows but a generation batch holds {prompts_per_batch} prompts "
            "(generation_batch_size // num_generations): the prompts beyond its rows would get the fallback's "
            f"advantage; build it with num_prompts >= {prompts_per_batch}"
        )
    if tracker.process_group is not None:
        raise ValueError(
            "the tracker has a process group, but TRL gathers every process's rewards itself: build it "
            "without process_group (each process updates its own copy with the gathered batch)"
        )
    if tracker.device != resolve_device(device):
        raise ValueError(
            f"the tracker is on {tracker.device} but the trainer on {device}; build it with device={device}"
        )
    if tracker.keys == "ids" and tracker.memory != "none" and prompt_key in ("prompt", "prompt_ids"):
        raise ValueError(
            f"prompt_key={prompt_key!r} gives hashed keys, but the tracker takes ids (keys='ids'): build it "
            "with keys='hashed', or pass prompt_key=<a dataset column of ids in [0, num_prompts)>"
        )


def _column_keys(
    inputs: Sequence[Mapping[str, Any]], column: str, *, hashed: bool, device: torch.device
) -> torch.Tensor:
    """int64 [B]: each example's key from a dataset column (``identity_keys``): integers as they are, else hashed."""
    missing = [index for index, example in enumerate(inputs) if column not in example]
    if missing:
        raise KeyError(
            f"example {missing[0]} of the batch has no {column!r} column to key its prompt by; pass "
            "prompt_key='prompt_ids' or the name of a column every example has"
        )
    values: List[Any] = [example[column] for example in inputs]
    if not hashed and not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        raise ValueError(
            f"column {column!r} holds non-integers, but the tracker takes ids (keys='ids'): build it with "
            "keys='hashed' to key prompts by their text"
        )
    try:
        return identity_keys(values, device=device)
    except ValueError as error:
        raise ValueError(
            f"column {column!r}: {error}; pass prompt_key='prompt_ids' (the token ids) or the name of a dataset "
            "column that identifies each prompt"
        ) from None


class TrackedGRPOTrainer(_TrackedAdvantages, trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a tracker of this package computing the advantages.

    Both of TRL's ``multi_objective_aggregation`` orders are reproduced: a
    tracker with the config's ``reward_weights`` (``num_rewards`` = the
    number of reward functions) is given each function's reward and combines
    them itself (see the module docstring).

    Takes every argument ``GRPOTrainer`` takes, and:

    Args:
        tracker: an ``AdvantageTracker`` on the trainer's device, without a
            process group; by default ``grpo_tracker`` with the config's
            ``scale_rewards``, ``multi_objective_aggregation`` and
            ``reward_weights`` (memoryless: TRL's own advantages).
        prompt_key: what identifies a prompt across steps: ``"prompt"``,
            ``"prompt_ids"`` or a dataset column (see the module docstring).

    Raises:
        ValueError: for a tracker whose rewards do not fit the reward
            functions (``_check_tracker_rewards``).

    Example:
        >>> from rail_interview.stat_tracking import presets
        >>> tracker = presets.trl_grpo(64, memory="ema", decay=0.9, min_count=4, keys="hashed")
        >>> # trainer = TrackedGRPOTrainer(model=model, reward_funcs=reward, args=config,
        >>> #                              train_dataset=dataset, tracker=tracker)
        >>> tracker.memory, tracker.keys
        ('ema', 'hashed')
    """

    _factory_name = "grpo_tracker"

    def _default_tracker(self, num_prompts: int, device: torch.device) -> AdvantageTracker:
        """``grpo_tracker`` for this trainer's ``scale_rewards``, ``multi_objective_aggregation`` and weights.

        With one reward function of weight 1 it is a tracker of one reward
        given the weighted sum, as before several rewards were reproduced;
        otherwise it weighs (and, with several, combines) the functions itself.
        """
        return grpo_tracker(
            num_prompts,
            self.scale_rewards,
            self.multi_objective_aggregation,
            self.reward_weights.tolist(),  # float32, as TRL weighs
            device=device,
        )

    def _expected_tracker(self, tracker: AdvantageTracker) -> AdvantageTracker:
        """The default tracker; for a tracker given the weighted sum, the one that normalises that sum."""
        if _weighs_rewards(tracker):
            return self._default_tracker(1, tracker.device)
        return grpo_tracker(1, self.scale_rewards, self.multi_objective_aggregation, device=tracker.device)

    def _check_tracker_rewards(self, tracker: AdvantageTracker) -> None:
        """Refuses a tracker that the C reward functions cannot feed.

        Raises:
            ValueError: for ``num_rewards`` other than 1 and C, weights of one
                reward with C > 1 functions, or C > 1 rewards with
                ``nan_rewards="refuse"`` (a function's None is NaN).
        """
        functions = len(self.reward_funcs)
        hint = (
            "build it with grpo_tracker(P, config.scale_rewards, config.multi_objective_aggregation, "
            f"config.reward_weights) (num_rewards={functions} where reward_weights is None), or with one reward "
            "and no reward_weights to be given their weighted sum"
        )
        if tracker.num_rewards > 1 and tracker.num_rewards != functions:
            raise ValueError(
                f"the tracker takes {tracker.num_rewards} rewards per sample (num_rewards={tracker.num_rewards}) but "
                f"the trainer has {functions} reward function(s); {hint}"
            )
        if tracker.num_rewards == 1 and _weighs_rewards(tracker) and functions > 1:
            raise ValueError(
                f"the tracker weighs one reward (reward_weights={tracker.reward_weights}) but the trainer has "
                f"{functions} reward functions; {hint}"
            )
        if tracker.num_rewards > 1 and tracker.nan_rewards != "invalid":
            raise ValueError(
                f"the tracker takes {tracker.num_rewards} rewards with nan_rewards={tracker.nan_rewards!r}, but a "
                "reward function that returns None gives NaN there: build it with nan_rewards='invalid' "
                "(grpo_tracker does)"
            )

    def _reward_differences(self, tracker: AdvantageTracker) -> List[str]:
        """For a tracker given the weighted sum under ``normalize_then_sum``: the order it cannot follow."""
        weights = tuple(self.reward_weights.tolist())
        if _weighs_rewards(tracker) or self.multi_objective_aggregation != "normalize_then_sum" or weights == (1.0,):
            return []
        return [
            f"num_rewards=1 and no reward_weights (the config's: {len(weights)} reward function(s) weighted "
            f"{weights} after each is normalised in its group, multi_objective_aggregation="
            "'normalize_then_sum'): the tracker is given their weighted sum"
        ]


class TrackedRLOOTrainer(_TrackedAdvantages, trl.RLOOTrainer):
    """TRL's ``RLOOTrainer`` with a tracker of this package computing the advantages.

    The reward the tracker takes is the one TRL's RLOO normalises: the
    weighted sum, clipped to ``reward_clip_range``, minus ``beta`` times the
    sequence's KL to the reference model. With ``normalize_advantages`` the
    tracker's advantages are then standardised over the batch's samples that
    got one (valid and not fallen back), as TRL standardises over its
    non-NaN advantages. ``RLOOConfig`` has no ``multi_objective_aggregation``
    (trl 1.16): the reward functions are always summed first, so a tracker
    that weighs its rewards itself is refused.

    Takes every argument ``RLOOTrainer`` takes, and:

    Args:
        tracker: an ``AdvantageTracker`` on the trainer's device, without a
            process group; by default ``rloo_tracker`` (memoryless: TRL's own
            leave-one-out advantages).
        prompt_key: what identifies a prompt across steps (see the module
            docstring).

    Example:
        >>> from rail_interview.stat_tracking import presets
        >>> tracker = presets.verl_rloo(64, memory="buffer", buffer_size=16, min_count=4,
        ...                             fallback="zero", keys="hashed")
        >>> # trainer = TrackedRLOOTrainer(model=model, reward_funcs=reward, args=config,
        >>> #                              train_dataset=dataset, tracker=tracker)
        >>> tracker.baseline
        'leave_one_out'
    """

    _factory_name = "rloo_tracker"

    def _default_tracker(self, num_prompts: int, device: torch.device) -> AdvantageTracker:
        """``rloo_tracker``."""
        return rloo_tracker(num_prompts, device=device)

    def _generate_and_score_completions(self, inputs):
        """As the shared one, keeping the log-probs TRL computes for its KL penalty."""
        self._logps_calls: Optional[List[torch.Tensor]] = [] if self.model.training and self.beta != 0.0 else None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._logps_calls = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        """TRL's log-probs, recorded while a training batch is scored with ``beta != 0``."""
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        calls = getattr(self, "_logps_calls", None)
        if calls is not None:
            calls.append(result[0])
        return result

    def _shape_rewards(self, rewards: torch.Tensor, output: Mapping[str, Any]) -> torch.Tensor:
        """TRL RLOO's reward: clipped, then minus ``beta`` times the KL (its arithmetic, in its order)."""
        if self.reward_clip_range:
            rewards = rewards.clamp(min=self.reward_clip_range[0], max=self.reward_clip_range[1])
        if self.beta != 0.0:
            calls = self._logps_calls or []
            if len(calls) < 2:
                raise RuntimeError(
                    "TRL's RLOO did not compute the policy's and the reference's log-probs while scoring; this "
                    f"TRL version ({trl.__version__}) is not one rail_interview.integrations.trl supports"
                )
            old_per_token_logps, ref_per_token_logps = calls[0], calls[1]
            per_token_kl = old_per_token_logps - ref_per_token_logps
            kl = (per_token_kl * output["completion_mask"]).sum(-1)
            rewards = rewards - self.beta * self.accelerator.gather(kl)
        return rewards

    def _finish_advantages(self, report: UpdateReport) -> torch.Tensor:
        """With ``normalize_advantages``: TRL's standardisation over the samples that got an advantage."""
        if not self.normalize_advantages:
            return report.advantages
        # TRL standardises its non-NaN advantages; a fallen-back sample is NaN there only when the
        # fallback is "zero" (TRL's rule for a group with one scorable sample).
        counted = report.valid & ~report.fallback if self.tracker.fallback == "zero" else report.valid
        masked = torch.where(counted, report.advantages, torch.nan)
        normalised = (masked - torch.nanmean(masked)) / (nanstd(masked) + 1e-4)
        return torch.nan_to_num(normalised, nan=0.0)
