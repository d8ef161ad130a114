"""verl's advantage estimators over a tracker, with the stable prompt keys and checkpoints memory needs.

**What verl offers.** ``verl.trainer.ppo.core_algos.register_adv_est(name)``
registers an advantage estimator; with ``algorithm.adv_estimator=<name>``,
``verl.trainer.ppo.ray_trainer.compute_advantage`` calls it with
``token_level_rewards`` and ``response_mask`` (float32 and int [bs, T]),
``index`` (the batch's ``uid`` column, a NumPy object array [bs]) and
``config`` (the ``algorithm`` section), and stores the ``(advantages,
returns)`` it returns, each [bs, T]. verl's own GRPO and RLOO sum the token
rewards to one score per sample, normalise each score within its group
(the samples of one uid), and return ``scores.unsqueeze(-1) *
response_mask`` twice. ``TrackerEstimator`` does the same with a tracker
of this package between the two: score, ``tracker.update``, mask.
``register_tracker_estimator(name, tracker)`` registers one through verl's
own ``register_adv_est``, and importing this module registers three
presets, ``"rail_verl_grpo"``, ``"rail_verl_rloo"`` and ``"rail_verl_opo"``
(``presets.verl_grpo``, ``presets.verl_rloo`` and ``presets.verl_opo``,
without memory): verl's GRPO, RLOO and OPO, to float32 rounding (see
``docs/verl.md`` for the bound the tests hold them to).

**Weights and several rewards.** A tracker that weighs its samples
(``weighted_stats``: OPO's length-weighted baseline; ``weighted_normalize``:
GDPO's token-weighted whitening) gets each response's length,
``response_mask.sum(-1)``, as its ``weights``. A tracker of several rewards
(``num_rewards=C``, ``presets.verl_gdpo``) reads the C scores from the
batch's ``algorithm.gdpo_reward_keys`` columns, as verl's ``gdpo`` does;
verl's ``compute_advantage`` passes those columns (``non_tensor_batch``) to
the estimator named ``"gdpo"`` only, so register such a tracker under that
name, ``register_tracker_estimator("gdpo", tracker, replace=True)``.

**The problem memory has.** ``RayPPOTrainer.fit`` gives every prompt a
fresh ``uuid4`` uid at every step, and the estimator sees nothing else of
the prompt, so a tracker that remembers prompts (``memory="buffer"`` or
``"ema"``) would never see one twice. The fix here: uids that carry a
stable key, ``"<key>/<uuid>"``, where the key is a decimal int64 computed
from the prompt (``prompt_keys_of``: by default a hash of its chat messages,
``raw_prompt``; or any dataset column). ``stamp_uids`` rewrites a batch's
uids so; the uuid part keeps each uid unique per prompt and step, so verl's
own grouping by uid (and its other uses of uids) is unchanged. The estimator
groups a tracker with memory by the key, and refuses plain uuid uids for it
(its memory would never persist); a tracker without memory groups by the
whole uid, exactly as verl does, and takes plain uids.

**The trainer.** ``TrackedRayPPOTrainer`` is ``RayPPOTrainer`` with three
methods overridden (``TrackerTrainerMixin``): ``_get_gen_batch``, which
``fit`` calls right after assigning the uuids, stamps them first;
``_save_checkpoint`` writes the tracker's ``state_dict()`` to
``global_step_N/rail_interview_tracker.pt`` next to verl's ``data.pt`` (before verl
writes its ``latest_checkpointed_iteration.txt``), and ``_load_checkpoint``
reads it back from the folder verl resumes from. All three run on verl's
driver (the TaskRunner process), where ``compute_advantage`` runs too: the
tracker lives there. The trainer finds its tracker through the estimator
registered under ``config.algorithm.adv_estimator``, which must be a
``TrackerEstimator`` registered in that process.

**Imports.** This module imports ``verl.trainer.ppo.core_algos`` (and
``verl.DataProto``); ``verl.trainer.ppo.ray_trainer``, which
``TrackedRayPPOTrainer`` subclasses, is imported only when that name is
first used: it needs ``cachetools``, ``uvicorn`` and ``fastapi``, which
verl 0.9.1 imports but does not declare. ``RayPPOTrainer`` is verl's legacy
trainer (``trainer.use_v1=False``, ``verl.trainer.main_ppo_v0``); verl's
V1 trainer, the default in 0.9.1, needs TransferQueue and is not supported
by the trainer class here.

Host work: uids are strings, so turning them into keys or groups takes
NumPy string operations over the batch (vectorised, no Python loop), and
``prompt_keys_of`` hashes each prompt's text on the host (a loop over the
prompts, once per step, before they are repeated for the rollouts).

Dimensions: bs samples (prompts times rollouts), T response tokens, B
prompts of a generation batch.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from verl import DataProto
from verl.trainer.ppo import core_algos

from rail_interview.stat_tracking import AdvantageTracker, identity_keys, presets, token_keys

__all__ = [
    "PRESET_NUM_PROMPTS",
    "PRESETS",
    "TRACKER_FILE",
    "TrackedRayPPOTrainer",  # noqa: F822 (built on first use by the module's __getattr__)
    "TrackerEstimator",
    "TrackerTrainerMixin",
    "load_tracker_state",
    "prompt_keys_of",
    "register_tracker_estimator",
    "registered_tracker",
    "save_tracker_state",
    "stamp_uids",
    "uid_keys",
]

#: The file, in verl's ``global_step_N`` folder, that holds the tracker's state.
TRACKER_FILE = "rail_interview_tracker.pt"

#: Distinct uids a preset's tracker takes per batch (its ``num_prompts``).
PRESET_NUM_PROMPTS = 65536

#: The estimators this module registers with verl when imported, by name.
PRESETS = ("rail_verl_grpo", "rail_verl_rloo", "rail_verl_opo")

_SEPARATOR = "/"  # between a uid's stable key and its uuid; no "_", which verl's V1 trainer splits keys on


class TrackerEstimator:
    """A verl advantage estimator over a tracker: scores, ``tracker.update``, token-level advantages.

    Called by ``compute_advantage`` with verl's keywords, it sums each
    sample's token rewards to a score (``token_level_rewards.sum(-1)``, in
    their dtype, as verl's GRPO and RLOO do), passes the scores to
    ``tracker.update`` with a key per sample, and returns the advantages,
    cast back to the scores' dtype, as ``advantages.unsqueeze(-1) *
    response_mask`` for both advantages and returns, as verl's GRPO and RLOO.

    Keys. A tracker with memory (``memory="buffer"`` or ``"ema"``) needs
    uids stamped with stable keys (``stamp_uids``; ``TrackedRayPPOTrainer``
    stamps them): its samples are keyed, and grouped, by those keys, which
    must suit the tracker (any int64 with ``keys="hashed"``; in [0, P) with
    ``keys="ids"``). A tracker without memory groups samples by their whole
    uid, as verl does, stamped or not: the batch's distinct uids become ids
    0 .. G - 1, compared as strings (any tracker's ``keys`` takes them; G must
    not exceed its ``num_prompts``).

    Everything is checked before the tracker is touched: a refused batch
    leaves its state unchanged.

    Args:
        tracker: the tracker, on any device; without a process group (verl
            computes advantages in one process, its driver).

    Raises:
        TypeError: if ``tracker`` is not an ``AdvantageTracker``.
        ValueError: if it has a process group.

    Example:
        >>> import numpy as np
        >>> estimator = TrackerEstimator(presets.verl_grpo(8))
        >>> rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.5, 0.0]])  # summed: 1, 0, 0.5
        >>> mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
        >>> advantages, returns = estimator(rewards, mask, index=np.array(["a", "a", "b"], dtype=object))
        >>> advantages  # group "a": +-0.71 on every response token; "b" alone keeps its score, as in verl
        tensor([[ 0.7071,  0.7071],
                [-0.7071, -0.7071],
                [ 0.5000,  0.0000]])
        >>> bool(returns.equal(advantages))
        True

        Several rewards (verl's ``gdpo``: the scores come from the batch's
        ``gdpo_reward_keys`` columns, the whitening is over response tokens):

        >>> estimator = TrackerEstimator(presets.verl_gdpo(8, 2))
        >>> columns = {"format": np.array([1.0, 0.0, 1.0]), "correct": np.array([0.0, 1.0, 1.0])}
        >>> advantages, _ = estimator(rewards, mask, index=np.array(["a", "a", "b"], dtype=object),
        ...                           config={"gdpo_reward_keys": ["format", "correct"]}, non_tensor_batch=columns)
        >>> advantages[:, 0]
        tensor([-0.4472, -0.4472,  1.7889])
    """

    def __init__(self, tracker: AdvantageTracker) -> None:
        if not isinstance(tracker, AdvantageTracker):
            raise TypeError(f"tracker must be an AdvantageTracker, got {type(tracker).__name__}")
        if tracker.process_group is not None:
            raise ValueError(
                "the tracker has a process group, but verl computes advantages in one process (its driver): "
                "build the tracker without process_group"
            )
        self._tracker = tracker

    @property
    def tracker(self) -> AdvantageTracker:
        """The tracker the advantages come from."""
        return self._tracker

    def __repr__(self) -> str:
        return f"TrackerEstimator({self._tracker!r})"

    def __call__(
        self,
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Optional[np.ndarray] = None,
        config: Optional[Any] = None,
        non_tensor_batch: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Computes a batch's advantages and updates the tracker, as verl's ``compute_advantage`` asks.

        Args:
            token_level_rewards: floating [bs, T], each response token's
                reward (float32 in verl).
            response_mask: [bs, T] (int, bool or float), on the rewards'
                device; 1 on response tokens.
            index: [bs], the samples' uids (verl's ``uid`` column), compared
                as strings; stamped (``"<key>/<uuid>"``) for a tracker with
                memory.
            config: verl's ``algorithm`` config (``AlgoConfig``), or None.
                ``norm_adv_by_std_in_grpo=False`` is refused unless the
                tracker divides by nothing (``scale="none"``): the tracker's
                options decide the advantages, not that flag. With several
                rewards, its ``gdpo_reward_keys`` name the score columns
                (``gdpo_reward_weights``, if set, must equal the tracker's
                ``reward_weights``).
            non_tensor_batch: the batch's non-tensor columns, which verl
                passes to the estimator named ``"gdpo"``; read only by a
                tracker of several rewards.
            **kwargs: other keywords ``compute_advantage`` may pass
                (``reward_baselines``, ``batch``), ignored, as verl's RLOO does.

        Returns:
            ``(advantages, returns)``, the same tensor: the advantage of each
            sample times ``response_mask``, [bs, T], of the dtype verl's GRPO
            returns (the rewards' dtype promoted with the mask's), on the
            rewards' device.

        Raises:
            TypeError: if the rewards are not a floating tensor or the mask
                not a tensor.
            ValueError: if the shapes or devices disagree, ``index`` is
                missing or not of length bs, a tracker with memory gets uids
                without stable keys or keys it cannot take, a batch holds
                more groups than the tracker has rows, or ``config`` asks
                for no std; also as ``tracker.update`` (non-finite rewards
                with ``check_values``). The tracker is then unchanged.
        """
        del kwargs  # reward_baselines (REMAX), batch and the like: not part of these estimators
        keys = self._check_and_key(token_level_rewards, response_mask, index, config)
        scores = token_level_rewards.sum(dim=-1)  # [bs], in the rewards' dtype, as verl
        tracker = self._tracker
        rewards = scores
        if tracker.num_rewards > 1:
            rewards = self._reward_columns(config, non_tensor_batch, len(scores), scores.device)  # [bs, C]
        options = {}
        if tracker.weighted_stats or tracker.weighted_normalize:
            options["weights"] = response_mask.sum(dim=-1).to(tracker.device)  # [bs], response lengths
        with torch.no_grad():
            advantages = tracker.update(keys.to(tracker.device), rewards.detach().to(tracker.device), **options)
            advantages = advantages.to(device=scores.device, dtype=scores.dtype)  # [bs]
            token_advantages = advantages.unsqueeze(-1) * response_mask  # [bs, T], verl's product and dtype
        return token_advantages, token_advantages

    def _reward_columns(
        self, config: Optional[Any], columns: Optional[Mapping[str, Any]], size: int, device: torch.device
    ) -> torch.Tensor:
        """float32 [bs, C]: the scores of ``gdpo_reward_keys``, as verl's gdpo reads them; refuses what does not fit."""
        names = _config_value(config, "gdpo_reward_keys")
        num_rewards = self._tracker.num_rewards
        if columns is None or not names:
            raise ValueError(
                f"the tracker takes {num_rewards} rewards per sample, read from the columns that "
                "algorithm.gdpo_reward_keys names; verl's compute_advantage passes those columns (non_tensor_batch) "
                "to the estimator named 'gdpo' only: register it with register_tracker_estimator('gdpo', tracker, "
                "replace=True) and set algorithm.gdpo_reward_keys"
            )
        names = list(names)
        if len(names) != num_rewards:
            raise ValueError(f"algorithm.gdpo_reward_keys names {len(names)} rewards; the tracker takes {num_rewards}")
        weights = _config_value(config, "gdpo_reward_weights")
        if weights is not None and tuple(float(w) for w in weights) != self._tracker.reward_weights:
            raise ValueError(
                f"algorithm.gdpo_reward_weights {list(weights)} differ from the tracker's reward_weights "
                f"{list(self._tracker.reward_weights)}: build the tracker with the config's weights"
            )
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(f"reward column(s) {missing} not in the batch; it has {sorted(columns)}")
        stacked = np.stack([np.asarray(columns[name], dtype=np.float32).reshape(-1) for name in names], axis=1)
        if stacked.shape[0] != size:
            raise ValueError(f"the reward columns hold {stacked.shape[0]} scores for {size} samples")
        return torch.from_numpy(stacked).to(device)  # [bs, C], float32 as verl's gdpo

    def _check_and_key(
        self, rewards: torch.Tensor, mask: torch.Tensor, index: Optional[np.ndarray], config: Optional[Any]
    ) -> torch.Tensor:
        """Checks the inputs, touching nothing, and returns int64 [bs] keys (or group ids) for ``update``."""
        if not isinstance(rewards, torch.Tensor) or not rewards.dtype.is_floating_point:
            kind = rewards.dtype if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise TypeError(f"token_level_rewards must be a floating tensor [bs, T], got {kind}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"response_mask must be a tensor [bs, T], got {type(mask).__name__}")
        if rewards.ndim != 2 or mask.shape != rewards.shape or mask.device != rewards.device:
            raise ValueError(
                f"token_level_rewards must be 2-D [bs, T] and response_mask of its shape and device; got "
                f"{tuple(rewards.shape)} on {rewards.device} and {tuple(mask.shape)} on {mask.device}"
            )
        if index is None:
            raise ValueError(
                "index (the batch's uid column) is missing: compute_advantage passes it when the batch has "
                "non_tensor_batch['uid'], which RayPPOTrainer.fit assigns"
            )
        uids = np.asarray(index, dtype=object)
        if uids.ndim != 1 or len(uids) != rewards.shape[0]:
            raise ValueError(f"index must hold one uid per sample, [{rewards.shape[0]}]; got shape {uids.shape}")
        if self._tracker.scale != "none" and not _norm_adv_by_std(config):
            raise ValueError(
                "algorithm.norm_adv_by_std_in_grpo=False asks for advantages without a std, but this estimator's "
                f"tracker divides by one (scale={self._tracker.scale!r}): register a tracker built with "
                "scale='none' (presets.verl_grpo(P, norm_adv_by_std=False), presets.dr_grpo(P, ...)) instead"
            )
        strings = uids.astype(str)  # [bs]
        num_rows = self._tracker.num_prompts
        if self._tracker.memory == "none":
            groups, ids = np.unique(strings, return_inverse=True)  # ids: [bs] in [0, G)
            if len(groups) > num_rows:
                raise ValueError(
                    f"the batch holds {len(groups)} distinct uids but the tracker has num_prompts={num_rows} rows: "
                    "build it with at least as many rows as prompts per batch"
                )
            return torch.from_numpy(ids.reshape(-1).astype(np.int64))
        keys = uid_keys(strings)
        if keys is None:
            example = strings[0] if len(strings) else ""
            raise ValueError(
                f"the tracker has memory={self._tracker.memory!r} but the uids carry no stable prompt key "
                f"(e.g. {example!r}): RayPPOTrainer.fit gives every prompt a fresh uuid at every step, so no prompt "
                "would ever be remembered. Train with TrackedRayPPOTrainer (or stamp_uids(batch) right after the "
                "uids are assigned), or use a tracker without memory"
            )
        if self._tracker.keys == "ids":
            outside = (keys < 0) | (keys >= num_rows)
            if outside.any():
                raise ValueError(
                    f"stable key {int(keys[outside][0])} lies outside [0, {num_rows}): a tracker with keys='ids' "
                    "needs keys that are prompt ids (a dataset column such as 'index', below num_prompts); "
                    "build it with keys='hashed' for hashed keys"
                )
        else:
            distinct = len(np.unique(keys))
            if distinct > num_rows:
                raise ValueError(
                    f"the batch holds {distinct} distinct prompts but the tracker has num_prompts={num_rows} rows: "
                    "build it with at least as many rows as prompts per batch (better: as many as it should remember)"
                )
        return torch.from_numpy(keys)


def _config_value(config: Optional[Any], name: str) -> Any:
    """An option of verl's ``algorithm`` config (``AlgoConfig``, a DictConfig or a dict), or None."""
    getter = getattr(config, "get", None)
    return getter(name, None) if callable(getter) else None


def _norm_adv_by_std(config: Optional[Any]) -> bool:
    """verl's ``norm_adv_by_std_in_grpo`` from an ``AlgoConfig``, a DictConfig or None (True)."""
    if config is None:
        return True
    getter = getattr(config, "get", None)
    value = getter("norm_adv_by_std_in_grpo", True) if callable(getter) else True
    return True if value is None else bool(value)


def register_tracker_estimator(name: str, tracker: AdvantageTracker, *, replace: bool = False) -> TrackerEstimator:
    """Registers an estimator over ``tracker`` with verl, so that ``algorithm.adv_estimator=<name>`` uses it.

    Registration goes through verl's own ``core_algos.register_adv_est`` and
    holds for this process: register in the process that runs verl's
    trainer (its TaskRunner), before the trainer is built, for instance in
    a module named by ``VERL_USE_EXTERNAL_MODULES``, which verl imports in
    every process.

    Args:
        name: the estimator's name in verl's registry.
        tracker: the ``AdvantageTracker`` the advantages come from.
        replace: take a name that is already registered, verl's own
            included, for this process. ``"gdpo"`` needs it: it is the only
            name whose estimator ``compute_advantage`` hands the per-reward
            columns a tracker of several rewards reads.

    Returns:
        The registered ``TrackerEstimator``.

    Raises:
        ValueError: if ``name`` is empty, or already taken (by verl's own
            estimators, ``AdvantageEstimator``'s names, or an earlier
            registration) without ``replace``, or the tracker has a process
            group.
        TypeError: if ``name`` is not a string or ``tracker`` not an
            ``AdvantageTracker``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    builtin = {estimator.value for estimator in core_algos.AdvantageEstimator}
    if (name in core_algos.ADV_ESTIMATOR_REGISTRY or name in builtin) and not replace:
        taken = core_algos.ADV_ESTIMATOR_REGISTRY.get(name, "verl's AdvantageEstimator")
        raise ValueError(
            f"an advantage estimator named {name!r} is already registered with verl ({taken!r}); "
            "choose another name, or pass replace=True to take its place in this process"
        )
    estimator = TrackerEstimator(tracker)
    core_algos.ADV_ESTIMATOR_REGISTRY.pop(name, None)  # replace: verl's register_adv_est refuses a taken name
    core_algos.register_adv_est(name)(estimator)
    return estimator


def registered_tracker(name: Union[str, Any]) -> AdvantageTracker:
    """The tracker of the estimator registered with verl under ``name``.

    Args:
        name: an ``algorithm.adv_estimator`` value (a string or verl's enum).

    Returns:
        The ``TrackerEstimator``'s tracker.

    Raises:
        ValueError: if no estimator of that name is registered, or it is not
            a ``TrackerEstimator``.
    """
    key = getattr(name, "value", name)
    estimator = core_algos.ADV_ESTIMATOR_REGISTRY.get(key)
    if not isinstance(estimator, TrackerEstimator):
        found = "nothing" if estimator is None else repr(estimator)
        raise ValueError(
            f"algorithm.adv_estimator={key!r} names {found}, not a tracker estimator: register one with "
            f"register_tracker_estimator({key!r}, tracker) in this process before building the trainer, or use "
            f"one of {', '.join(PRESETS)}"
        )
    return estimator.tracker


def uid_keys(uids: Any) -> Optional[np.ndarray]:
    """The stable keys of stamped uids (``"<key>/<uuid>"``), or None when none is stamped.

    Args:
        uids: [bs] uids (verl's ``uid`` column), compared as strings.

    Returns:
        int64 [bs] keys, or None if no uid carries a key.

    Raises:
        ValueError: if some uids carry a key and others not, or a key is
            not a decimal int64.

    Example:
        >>> uid_keys(["17/3f2a", "-4/9c1b"]), uid_keys(["3f2a"])
        (array([17, -4]), None)
    """
    strings = np.asarray(uids, dtype=object).astype(str).reshape(-1)  # [bs]
    parts = np.char.partition(strings, _SEPARATOR)  # [bs, 3]: key, separator, uuid
    stamped = parts[:, 1] == _SEPARATOR
    if not stamped.any():
        return None
    if not stamped.all():
        raise ValueError(
            f"{int((~stamped).sum())} of {len(strings)} uids carry no stable key (e.g. {strings[~stamped][0]!r}): "
            "stamp the whole batch (stamp_uids) or none of it"
        )
    try:
        return parts[:, 0].astype(np.int64)
    except (ValueError, OverflowError) as error:
        raise ValueError(
            f"a uid's stable key is not a decimal int64 (uids as stamp_uids writes them): {error}"
        ) from None


def prompt_keys_of(batch: DataProto, column: str = "raw_prompt") -> torch.Tensor:
    """Stable int64 keys of a batch's prompts, from one of its columns: the same in every process and run.

    * A tensor column: integer [B, L] token ids give ``token_keys`` (with the
      batch's ``attention_mask`` when it has one of that shape); integer
      [B] values are the keys.
    * A non-tensor column (verl's ``raw_prompt``, ``index``, ...), per
      prompt: an integer is its key; a string gives ``prompt_keys`` of it;
      anything else (chat messages: lists of dicts) gives ``prompt_keys``
      of its canonical JSON (sorted keys, no spaces, UTF-8). Values without
      a JSON form (images) are refused: key such prompts by another column.

    Note that verl's dataset sets ``index`` to 0 for rows whose
    ``extra_info`` has no ``index``: keying by it then makes one prompt of
    all of them.

    Args:
        batch: verl's batch of B prompts (before or after they are repeated).
        column: the column to key by.

    Returns:
        int64 [B] keys, on the host (or the tensor column's device).

    Raises:
        KeyError: if the batch has no such column.
        TypeError: if a tensor column is not integer [B] or [B, L].
        ValueError: if a value has no stable text form or an integer does
            not fit int64.

    Example:
        >>> messages = [[{"role": "user", "content": "2 + 2?"}], [{"content": "2 + 2?", "role": "user"}]]
        >>> raw_prompt = np.fromiter(messages, dtype=object, count=2)  # as verl's collate_fn builds it
        >>> batch = DataProto.from_single_dict({"dummy_tensor": torch.zeros(2, 1), "raw_prompt": raw_prompt})
        >>> prompt_keys_of(batch)  # one prompt, whatever the order of each message's fields
        tensor([-2742892044040521057, -2742892044040521057])
    """
    if batch.batch is not None and column in batch.batch.keys():
        values = batch.batch[column]
        if values.dtype.is_floating_point or values.dtype.is_complex or values.ndim not in (1, 2):
            raise TypeError(
                f"column {column!r} must be integer [B] keys or [B, L] token ids, got {values.dtype} "
                f"{tuple(values.shape)}"
            )
        if values.ndim == 1:
            return values.long()
        mask = batch.batch.get("attention_mask", None)
        return token_keys(values, mask if mask is not None and mask.shape == values.shape else None)
    if column not in batch.non_tensor_batch:
        tensors = [] if batch.batch is None else list(batch.batch.keys())
        raise KeyError(f"the batch has no column {column!r}; it has {sorted(tensors) + sorted(batch.non_tensor_batch)}")
    try:
        return identity_keys(batch.non_tensor_batch[column])
    except ValueError as error:
        raise ValueError(
            f"column {column!r}: {error}; key the prompts by another column (prompt_key_column='index', or a "
            "column of prompt ids or strings)"
        ) from None


def stamp_uids(batch: DataProto, column: str = "raw_prompt") -> np.ndarray:
    """Rewrites a batch's uids as ``"<stable key>/<uuid>"``, in place, keyed by ``column``.

    Call it right after verl assigns the uids (``TrackedRayPPOTrainer``
    does, in ``_get_gen_batch``). The uuid part is kept, so each uid stays
    unique per prompt and step and verl groups rollouts as before; stamping
    twice changes nothing.

    Args:
        batch: verl's batch of B prompts, with ``non_tensor_batch["uid"]``.
        column: the column the keys come from (see ``prompt_keys_of``).

    Returns:
        The new uids, an object array [B] of strings, also set as the batch's ``uid``.

    Raises:
        KeyError: if the batch has no ``uid`` or no ``column``.
        TypeError, ValueError: as ``prompt_keys_of``.

    Example:
        >>> batch = DataProto.from_single_dict({"dummy_tensor": torch.zeros(2, 1), "index": np.array([7, 7])})
        >>> batch.non_tensor_batch["uid"] = np.array(["a1", "b2"], dtype=object)
        >>> stamp_uids(batch, "index")
        array(['7/a1', '7/b2'], dtype=object)
    """
    if "uid" not in batch.non_tensor_batch:
        raise KeyError("the batch has no 'uid' column to stamp: verl assigns it in fit() before _get_gen_batch")
    keys = prompt_keys_of(batch, column).cpu().numpy()  # [B]
    uuids = np.char.rpartition(np.asarray(batch.non_tensor_batch["uid"], dtype=object).astype(str), _SEPARATOR)
    stamped = np.char.add(np.char.add(keys.astype(str), _SEPARATOR), uuids[:, 2]).astype(object)  # [B]
    batch.non_tensor_batch["uid"] = stamped
    return stamped


def save_tracker_state(tracker: AdvantageTracker, folder: str) -> str:
    """Writes the tracker's state to ``folder/rail_interview_tracker.pt``, atomically.

    Args:
        tracker: the tracker.
        folder: verl's ``global_step_N`` folder (created if missing).

    Returns:
        The file's path.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TRACKER_FILE)
    state = {name: tensor.detach().cpu() for name, tensor in tracker.state_dict().items()}
    torch.save({"tracker": repr(tracker), "state_dict": state}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_tracker_state(tracker: AdvantageTracker, folder: str) -> bool:
    """Loads the tracker's state from ``folder/rail_interview_tracker.pt``.

    A folder without the file (a checkpoint saved by a trainer without a
    tracker) is refused for a tracker with memory, which would silently
    start over; a tracker without memory has nothing to lose and is left
    as it is.

    Args:
        tracker: the tracker, built with the arguments of the one saved.
        folder: verl's ``global_step_N`` folder.

    Returns:
        True if a state was loaded, False if there was none (a tracker
        without memory).

    Raises:
        FileNotFoundError: if the file is missing and the tracker has memory.
        ValueError: if the saved state does not fit the tracker (the
            tracker is then unchanged).
    """
    path = os.path.join(folder, TRACKER_FILE)
    if not os.path.exists(path):
        if tracker.memory == "none":
            return False
        raise FileNotFoundError(
            f"no tracker state at {path} (a checkpoint saved without a tracker?): the tracker's memory "
            f"({tracker.memory}) would start over. To resume with an empty memory on purpose, write one "
            "first: save_tracker_state(tracker, folder) with a fresh tracker"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    try:
        tracker.load_state_dict(saved["state_dict"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{path} holds the state of {saved['tracker']}, which does not fit {tracker!r}: {error}"
        ) from None
    return True


class TrackerTrainerMixin:
    """What ``TrackedRayPPOTrainer`` adds to verl's ``RayPPOTrainer``: stable uids and the tracker's checkpoints.

    Put it before ``RayPPOTrainer`` (or a subclass of it) in the bases.
    The tracker is the one of the ``TrackerEstimator`` registered under
    ``config.algorithm.adv_estimator`` (``registered_tracker``), found when
    the trainer is built. The overridden methods, each calling verl's:

    * ``_get_gen_batch(batch)``: stamps the uids ``fit`` has just assigned
      (``stamp_uids(batch, prompt_key_column)``), then splits the batch as
      verl does; both halves carry the stamped uids.
    * ``_save_checkpoint()``: writes the tracker's state to
      ``<default_local_dir>/global_step_N/rail_interview_tracker.pt``, then saves what
      verl saves (the latest-checkpoint marker last).
    * ``_load_checkpoint()``: loads what verl loads, then the tracker's state
      from the folder verl resumed from (``resume_mode`` ``auto`` or
      ``resume_path``; nothing when it starts from scratch; a folder
      without the file is refused for a tracker with memory, see
      ``load_tracker_state``).

    Args:
        *args: ``RayPPOTrainer``'s arguments.
        prompt_key_column: the batch column prompts are keyed by
            (``prompt_keys_of``): ``"raw_prompt"`` (the chat messages) by
            default.
        **kwargs: ``RayPPOTrainer``'s keyword arguments.

    Raises:
        ValueError: if ``config.algorithm.adv_estimator`` does not name a
            registered ``TrackerEstimator``.

    Example:
        >>> from rail_interview.integrations.verl import TrackedRayPPOTrainer
        >>> [cls.__name__ for cls in TrackedRayPPOTrainer.__mro__[:3]]
        ['TrackedRayPPOTrainer', 'TrackerTrainerMixin', 'RayPPOTrainer']
        >>> registered_tracker("rail_verl_rloo").baseline
        'leave_one_out'
    """

    def __init__(self, *args: Any, prompt_key_column: str = "raw_prompt", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_key_column = prompt_key_column
        self.advantage_tracker = registered_tracker(self.config.algorithm.adv_estimator)

    def _get_gen_batch(self, batch: DataProto) -> DataProto:
        """Stamps the batch's uids with stable keys, then splits it as verl does.

        Args:
            batch: the batch of prompts ``fit`` has just given uuids.

        Returns:
            verl's generation batch.
        """
        stamp_uids(batch, self.prompt_key_column)
        return super()._get_gen_batch(batch)

    def _save_checkpoint(self) -> Any:
        """Saves the tracker's state in this step's folder, then verl's checkpoint.

        Returns:
            What verl's ``_save_checkpoint`` returns.
        """
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        save_tracker_state(self.advantage_tracker, folder)
        return super()._save_checkpoint()

    def _load_checkpoint(self) -> Any:
        """Loads verl's checkpoint, then the tracker's state from the same folder.

        Returns:
            What verl's ``_load_checkpoint`` returns.

        Raises:
            RuntimeError: if verl resumed from another step than the folder
                found the way verl 0.9.1 finds it (a verl version that
                resolves checkpoints otherwise), rather than load a wrong state.
        """
        folder = self._resume_folder()
        result = super()._load_checkpoint()
        if folder is not None:
            resumed = f"global_step_{self.global_steps}"
            if os.path.basename(os.path.normpath(folder)) != resumed:
                raise RuntimeError(
                    f"verl resumed at step {self.global_steps} but the tracker's state was looked for in {folder}: "
                    "this verl version finds its checkpoint otherwise than TrackerTrainerMixin._resume_folder "
                    "expects (tested with verl 0.9.1)"
                )
            load_tracker_state(self.advantage_tracker, folder)
        return result

    def _resume_folder(self) -> Optional[str]:
        """The ``global_step_N`` folder verl's ``_load_checkpoint`` resumes from, as it finds it; None for none."""
        from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

        trainer = self.config.trainer
        if trainer.resume_mode == "disable" or trainer.default_hdfs_dir is not None:
            return None  # nothing to load (verl refuses hdfs loads itself)
        if trainer.resume_mode == "resume_path":
            folder = trainer.resume_from_path
            return (
                os.path.join(os.getcwd(), folder) if isinstance(folder, str) and not os.path.isabs(folder) else folder
            )
        return find_latest_ckpt_path(os.path.abspath(trainer.default_local_dir))


_TRAINER_DOC = """verl's ``RayPPOTrainer`` with a tracker's estimator: stable uids, and the tracker in its checkpoints.

    ``TrackerTrainerMixin`` over ``verl.trainer.ppo.ray_trainer.RayPPOTrainer``
    (verl's legacy trainer, ``trainer.use_v1=False``); built on first use of
    the name, as importing ``ray_trainer`` needs ``cachetools``, ``uvicorn``
    and ``fastapi``. Build it as ``RayPPOTrainer``, with
    ``prompt_key_column=`` besides; see ``TrackerTrainerMixin``.

    Args:
        *args: ``RayPPOTrainer``'s arguments.
        prompt_key_column: the batch column prompts are keyed by.
        **kwargs: ``RayPPOTrainer``'s keyword arguments.
"""


def __getattr__(name: str) -> Any:
    """Builds ``TrackedRayPPOTrainer`` on first use, importing verl's ``ray_trainer`` only then."""
    if name != "TrackedRayPPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    trainer = type(name, (TrackerTrainerMixin, RayPPOTrainer), {"__module__": __name__, "__doc__": _TRAINER_DOC})
    globals()[name] = trainer
    return trainer


def _register_presets() -> None:
    """Registers ``rail_verl_grpo``, ``rail_verl_rloo`` and ``rail_verl_opo``: verl's own, over memoryless trackers."""
    builds = {
        "rail_verl_grpo": presets.verl_grpo,
        "rail_verl_rloo": presets.verl_rloo,
        "rail_verl_opo": presets.verl_opo,
    }
    for name in PRESETS:
        register_tracker_estimator(name, builds[name](PRESET_NUM_PROMPTS))


_register_presets()
