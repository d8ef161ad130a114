"""The interface every stat tracker implements, and what they share.

A stat tracker turns a batch of (prompt id, reward) pairs into advantages,
``(reward - mean) / (std + eps)``. Subclasses differ in where ``mean`` and
``std`` come from: the whole batch, a per-prompt ring buffer, or a per-prompt
exponential moving average.

Dimensions, named once here and used in every docstring and shape comment of
this package:
    N: samples in one batch passed to ``update``.
    P: prompts the tracker knows (``num_prompts``); prompt ids lie in [0, P).
    K: reward slots per prompt of the buffer tracker (``buffer_size``).

All state lives in fixed-shape tensors on the tracker's device, allocated once
in the constructor and only ever modified in place, so that ``update`` can be
captured in a CUDA graph and ``load_state_dict`` keeps those captures valid.

Dtypes: the state is kept in the tracker's ``dtype``; statistics are
accumulated in ``ops.compute_dtype(dtype)`` (float32 for float16 and
bfloat16), and advantages are computed there and returned in ``dtype``:

* float32 and float64: rewards, and their deviations from a mean, up to
  about 1e19 (float64: 1e154): their squares must fit the dtype. The mean
  is exact to the dtype's rounding at the rewards' magnitude (about 1e-7
  relative in float32), so a prompt whose spread is below about 1e-5 of its
  rewards' magnitude needs float64.
* bfloat16: float32's range, about 3 significant digits per stored value.
* float16: rewards and stored statistics within +-65504, about 3
  significant digits, and steps of 1 above 1024 (so rewards near 60000 are
  rounded to multiples of 32 before anything is computed).

Advantages larger than the dtype's range become +-inf (in float16, beyond
65504: a spread below about 1e-5 of ``|reward - mean|``). Wherever the
advantage fits the dtype it is finite.
"""

from __future__ import annotations

import abc
import math
from typing import Dict, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from rail_interview.stat_tracking.ops import cast, compute_dtype, is_compiling

Device = Union[str, torch.device, None]


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    """Gathers equal-sized tensors from every rank into ``output``, in rank order.

    ``all_gather_single`` replaced the deprecated ``all_gather_into_tensor``
    in recent torch, with the same arguments; older torch, which setup.py
    allows, has only the latter. Resolved at call time, so that importing
    this package works on torch builds without distributed support.

    Args:
        output: [world_size * N, ...], written in place.
        tensor: [N, ...], this rank's part.
        group: the process group, or None for the default one.
    """
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


class TrackerStats(NamedTuple):
    """Per-prompt statistics held by a tracker, as returned by ``stats()``.

    Attributes:
        mean: float [P], the mean reward the tracker holds for each prompt;
            NaN for a prompt it holds nothing for.
        std: float [P], the matching population standard deviation (eps not
            added); NaN for a prompt it holds nothing for.
        count: int64 [P], how many rewards stand behind ``mean`` and ``std``.
        fallback: bool [P], True for prompts that hold fewer than
            ``min_count`` rewards. Right after ``update`` of a tracker with
            memory, it tells which prompts of that batch got the fallback
            (the batch is counted before the choice is made); without
            memory, True everywhere (see ``UpdateReport.fallback``).
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    fallback: torch.Tensor


class UpdateReport(NamedTuple):
    """What one update did to each sample, as returned by ``update_with_report``.

    Every field is a tensor on the tracker's device, computed without a host
    sync, so a trainer can log it every step and read it back when it logs.

    Attributes:
        advantages: ``dtype`` [N], as ``update`` returns them.
        valid: bool [N], the samples that counted: not masked out by
            ``valid`` and, with ``nan_rewards="invalid"``, not NaN.
        fallback: bool [N], valid samples whose prompt held fewer than
            ``min_count`` rewards (this batch included), so that the
            tracker's fallback set their advantage.
        zero_variance: bool [N], valid samples whose prompt's valid rewards
            in this batch are all exactly equal (a prompt with one valid
            sample included): the groups that carry no signal within the
            batch, which DAPO-style trainers drop.
        zero_variance_fraction: float32 scalar, the fraction of the batch's
            prompts (those with at least one valid sample) whose valid
            rewards are all equal; 0 when no sample is valid.
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    fallback: torch.Tensor
    zero_variance: torch.Tensor
    zero_variance_fraction: torch.Tensor

    def local(self, samples: slice) -> "UpdateReport":
        """Returns the report of some samples; the fraction stays the whole batch's.

        Args:
            samples: the samples to keep, such as one rank's part of a gathered batch.
        """
        return UpdateReport(
            self.advantages[samples],
            self.valid[samples],
            self.fallback[samples],
            self.zero_variance[samples],
            self.zero_variance_fraction,
        )


def resolve_device(device: Device) -> torch.device:
    """Returns a concrete device: ``None`` means CPU, ``"cuda"`` gets its index.

    Args:
        device: anything ``torch.device`` accepts, or None.

    Returns:
        The device that tensors allocated on ``device`` end up on, so that it
        compares equal to ``tensor.device`` (``cuda`` becomes ``cuda:0``).
    """
    return torch.empty(0, device=device).device  # pragma: no mutate (any size gives the device)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the integer dtypes that can hold prompt ids (bool does not count).

    Args:
        dtype: any torch dtype.
    """
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_positive_int(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is an int >= 1 (bool does not count).

    Args:
        name: the argument's name, for the message.
        value: the value to check.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class StatTracker(abc.ABC):
    """Base class: validates inputs, then computes advantages in a subclass.

    Subclasses implement ``_update`` (on inputs already validated and
    converted), ``stats``, ``fallback_mask`` and ``_state_tensors``; this class
    provides the public ``update``, ``state_dict`` and ``load_state_dict`` with
    the input and state checks that every tracker needs.

    Args:
        num_prompts: P, the number of distinct prompt ids, ids in [0, P).
        eps: added to the standard deviation before dividing.
        device: where the state lives; inputs must be on the same device.
        dtype: floating dtype of the state and of the advantages returned.
        check_values: if True, ``update`` checks that ids lie in [0, P) and
            rewards are finite. On a GPU each check is a host sync; switch it
            off for a sync-free hot path once the inputs are trusted. Shapes,
            dtypes and devices are always checked (that costs no sync).
        process_group: a ``torch.distributed`` process group, or None for a
            single process. With a group, every rank passes its local batch
            to ``update``; the tracker all-gathers the batches in rank order,
            updates identical state on every rank, and returns the local
            samples' advantages. Local batches must have the same size on
            every rank. Use gloo with a CPU tracker, NCCL with a CUDA one.

    Raises:
        ValueError: if ``num_prompts`` is not positive, ``eps`` is negative
            or ``dtype`` is not a floating dtype.
    """

    def __init__(
        self,
        num_prompts: int,
        *,
        eps: float,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        check_positive_int("num_prompts", num_prompts)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self._num_prompts = num_prompts
        self._eps = float(eps)
        self._device = resolve_device(device)
        self._dtype = dtype
        self._compute_dtype = compute_dtype(dtype)  # what statistics accumulate in
        self.check_values = check_values
        self._process_group = process_group

    @property
    def num_prompts(self) -> int:
        """P, the number of prompt ids the tracker accepts."""
        return self._num_prompts

    @property
    def eps(self) -> float:
        """Added to the standard deviation before dividing."""
        return self._eps

    @property
    def device(self) -> torch.device:
        """The device of the state; inputs must be on it."""
        return self._device

    @property
    def process_group(self) -> Optional["torch.distributed.ProcessGroup"]:
        """The process group whose ranks share this tracker's statistics, or None."""
        return self._process_group

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the state and of the advantages."""
        return self._dtype

    def update(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Adds a batch of rewards to the statistics and returns its advantages.

        Args:
            prompt_ids: integer [N], the prompt id of each sample, in [0, P).
            rewards: float or integer [N], the reward of each sample (integer
                rewards are converted to ``dtype``, never truncated).
            valid: bool [N], False for samples that must not count (never
                enter memory or any statistic, and get advantage 0), or
                None for all valid. With a process group, pass it on every
                rank or on none.

        Returns:
            ``dtype`` [N], the advantage of each sample, on ``device``.

        Raises:
            TypeError: if an input is not a tensor, ids are not integers or
                rewards are neither floating nor integer.
            ValueError: if the inputs are not 1-D of one length, are on
                another device, or (with ``check_values``) an id lies outside
                [0, P) or a reward is not finite once converted to ``dtype``.
                The state is then unchanged. Without ``check_values`` such
                values are not caught: an id outside [0, P) is undefined
                behaviour (an IndexError on a CPU, a device-side assert on
                CUDA) and a NaN reward poisons its prompt's statistics
                (unless the tracker takes NaN as unscorable:
                ``AdvantageTracker(nan_rewards="invalid")``).
                With a process group and ``check_values``, the ranks first
                agree on validity and batch sizes, so that bad input on one
                rank raises on every rank instead of leaving the others
                waiting in a collective. Without ``check_values`` there is
                no such agreement (it would cost a host sync): a rank whose
                input is refused raises alone and the others wait in the
                all-gather until the process group's timeout.
        """
        return self._dispatch(prompt_ids, rewards, valid, report=False)

    def _dispatch(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor], report: bool
    ) -> Union[torch.Tensor, "UpdateReport"]:
        """Validates, then runs ``_update`` here or on the batch gathered from every rank."""
        if self._process_group is None:
            prompt_ids, rewards, valid = self._validate_inputs(prompt_ids, rewards, valid)
            return self._update(prompt_ids, rewards, valid, report)
        import torch.distributed as dist  # pylint: disable=import-outside-toplevel

        group = self._process_group
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        error: Optional[Exception] = None
        try:
            prompt_ids, rewards, valid = self._validate_inputs(prompt_ids, rewards, valid)
        except (TypeError, ValueError) as caught:
            if not self.check_values:
                raise
            error = caught
        if self.check_values:
            # One small collective (and host sync) for the verdict: every rank's
            # batch size (-1 for a rank whose input was refused) and whether it
            # passed a valid mask.
            verdict = torch.tensor(
                [-1 if error is not None else len(prompt_ids), valid is not None], device=self._device
            )
            verdicts = torch.empty(2 * world_size, dtype=verdict.dtype, device=self._device)
            all_gather_single(verdicts, verdict, group=group)
            sizes_list, masked = verdicts[0::2].tolist(), verdicts[1::2].tolist()
            if error is not None:
                raise error
            refused = [r for r, n in enumerate(sizes_list) if n < 0]
            if refused:
                raise ValueError(f"rank(s) {refused} refused their input to update; see the error there")
            if len(set(sizes_list)) > 1:
                raise ValueError(f"local batches must have the same size on every rank, got sizes {sizes_list}")
            if len(set(masked)) > 1:
                raise ValueError(
                    f"valid must be passed on every rank or on none; ranks that passed it: "
                    f"{[r for r, m in enumerate(masked) if m]}"
                )
        num_local = len(prompt_ids)
        gathered = []
        for local in (prompt_ids, rewards) if valid is None else (prompt_ids, rewards, valid):
            whole = torch.empty(world_size * num_local, dtype=local.dtype, device=self._device)
            all_gather_single(whole, local.contiguous(), group=group)
            gathered.append(whole)
        all_valid = gathered[2] if valid is not None else None
        result = self._update(gathered[0], gathered[1], all_valid, report)  # [world_size * N]
        mine = slice(rank * num_local, (rank + 1) * num_local)
        return result.local(mine) if report else result[mine]

    @abc.abstractmethod
    def _update(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor], report: bool
    ) -> Union[torch.Tensor, "UpdateReport"]:
        """Does the work of ``update`` on validated inputs.

        Args:
            prompt_ids: int64 [N] on ``device``, in [0, P).
            rewards: ``dtype`` [N] on ``device``.
            valid: bool [N] on ``device``, or None for all valid.
            report: return an ``UpdateReport`` instead of the advantages.

        Returns:
            ``dtype`` [N], the advantages, or their ``UpdateReport``.
        """

    def stats(self, prompt_ids: Optional[torch.Tensor] = None) -> TrackerStats:
        """Returns a copy of the per-prompt statistics (see ``TrackerStats``).

        Args:
            prompt_ids: integer [M] tensor on ``device``, the prompts to
                report, or None for all P. Asking for a few prompts costs
                O(M), not O(P).

        Returns:
            TrackerStats of [M] (or [P]) tensors.

        Raises:
            TypeError, ValueError: if ``prompt_ids`` is not a 1-D integer
                tensor on ``device``, or (with ``check_values``) an id lies
                outside [0, P); as for ``update``'s ids.
        """
        if prompt_ids is not None:
            prompt_ids = self._validate_prompt_ids(prompt_ids, "stats")
        return self.stats_from_snapshot(self.stats_snapshot(prompt_ids))

    @abc.abstractmethod
    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the raw state behind ``stats`` for some prompts, computing nothing.

        This is the cheap half of ``stats``, for recording statistics every
        step and computing them later for many steps at once (see
        ``PromptStatsRecorder``). The tensors may alias the live state: copy
        them before the next ``update``.

        Args:
            prompt_ids: int64 [M] on ``device``, or None for all P prompts.

        Returns:
            Tensors by name, each with the prompt dimension [M] (or [P]) first.
        """

    @abc.abstractmethod
    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes ``stats`` from snapshots, stacked along any leading dimensions.

        Args:
            snapshot: as returned by ``stats_snapshot``, each tensor with extra
                leading dimensions [*B] if several snapshots were stacked.

        Returns:
            TrackerStats of new [*B, M] tensors.
        """

    def fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Tells which prompts hold too few rewards for their own statistics.

        Called right after ``update(prompt_ids, rewards)`` of a tracker with
        memory, it tells which of that batch's samples got the tracker's
        fallback (the whole batch's statistics, for DDPO's): the batch is
        counted before that choice is made. A tracker without memory holds
        nothing after the update, so it says True everywhere;
        ``update_with_report`` tells which samples of the batch fell back,
        for every tracker.

        Args:
            prompt_ids: integer [N] tensor on ``device``, checked as
                ``update``'s ids are.

        Returns:
            bool [N], True where the prompt holds fewer than ``min_count``
            rewards (always True for a tracker without per-prompt state).

        Raises:
            TypeError, ValueError: for bad ids, as ``stats``.
        """
        return self._fallback_mask(self._validate_prompt_ids(prompt_ids, "fallback_mask"))

    @abc.abstractmethod
    def _fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Does the work of ``fallback_mask`` on validated ids.

        Args:
            prompt_ids: int64 [N] on ``device``, in [0, P).

        Returns:
            bool [N], True where the prompt holds fewer than ``min_count``
            rewards (always True for a tracker without per-prompt state).
        """

    @abc.abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Returns the state tensors by name: the live ones, or views built from them.

        ``state_dict`` copies these; ``load_state_dict`` checks a candidate
        against their shapes and dtypes, then hands it to ``_assign_state``.
        """

    def _check_state_values(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raises ValueError if a candidate state breaks the tracker's invariants.

        Called by ``load_state_dict`` after keys, shapes and dtypes have been
        checked and before anything is copied. The default accepts anything.

        Args:
            state: tensors by name, of the right shapes and dtypes, on any
                device.
        """
        del state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns a copy of the state, safe to keep while updating goes on.

        Returns:
            Tensors by name, on ``device``. Pass them to ``load_state_dict`` of
            a tracker built with the same arguments to continue identically.
        """
        return {name: tensor.clone() for name, tensor in self._state_tensors().items()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replaces the state with a copy of ``state_dict``, in place.

        Everything is checked before anything is copied, so a refused state
        leaves the tracker exactly as it was. The state tensors keep their
        identity (they are copied into), so a captured CUDA graph stays valid.

        Args:
            state_dict: as returned by ``state_dict`` of a tracker of the same
                class, num_prompts, buffer size and dtype; on any device.

        Raises:
            TypeError: if ``state_dict`` is not a mapping of tensors.
            ValueError: if its keys, shapes or dtypes differ from this
                tracker's, or its values break the tracker's invariants.
        """
        live = self._state_tensors()
        kind = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{kind}.load_state_dict expects a mapping, got {type(state_dict).__name__}")
        if set(state_dict) != set(live):
            raise ValueError(
                f"{kind}.load_state_dict expects keys {sorted(live)}, got {sorted(state_dict)}: "
                "is this the state of another kind of tracker?"
            )
        for name, tensor in live.items():
            given = state_dict[name]
            if not isinstance(given, torch.Tensor):
                raise TypeError(f"{kind} state {name!r} must be a tensor, got {type(given).__name__}")
            if given.shape != tensor.shape or given.dtype != tensor.dtype:
                raise ValueError(
                    f"{kind} state {name!r} must have shape {tuple(tensor.shape)} and dtype "
                    f"{tensor.dtype}, got shape {tuple(given.shape)} and dtype {given.dtype}"
                )
        self._check_state_values(state_dict)
        self._assign_state(state_dict)

    def _assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked state into the live state tensors, in place.

        The default copies each tensor of ``_state_tensors`` from ``state``; a
        tracker whose live state is laid out differently from its state dict
        overrides this.

        Args:
            state: tensors by name, already checked by ``load_state_dict``.
        """
        for name, tensor in self._state_tensors().items():
            tensor.copy_(state[name])

    def _validate_inputs(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Checks the inputs of ``update`` and converts them.

        Args:
            prompt_ids: as passed to ``update``.
            rewards: as passed to ``update``.
            valid: as passed to ``update``.

        Returns:
            prompt_ids as int64 [N], rewards as ``dtype`` [N] and valid as
            bool [N] or None.

        Raises:
            TypeError, ValueError: as documented in ``update``.
        """
        if not isinstance(prompt_ids, torch.Tensor) or not isinstance(rewards, torch.Tensor):
            raise TypeError(
                "prompt_ids and rewards must be torch tensors, got "
                f"{type(prompt_ids).__name__} and {type(rewards).__name__}"
            )
        if prompt_ids.ndim != 1 or rewards.shape != prompt_ids.shape:
            raise ValueError(
                "prompt_ids and rewards must be 1-D tensors of one length [N], got shapes "
                f"{tuple(prompt_ids.shape)} and {tuple(rewards.shape)}"
            )
        if not is_integer_dtype(prompt_ids.dtype):
            raise TypeError(f"prompt_ids must be an integer tensor, got dtype {prompt_ids.dtype}")
        if rewards.dtype.is_complex or rewards.dtype == torch.bool:
            raise TypeError(f"rewards must be a floating or integer tensor, got dtype {rewards.dtype}")
        if prompt_ids.device != self._device or rewards.device != self._device:
            raise ValueError(
                f"prompt_ids and rewards must be on the tracker's device {self._device}, got "
                f"{prompt_ids.device} and {rewards.device}"
            )
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
                kind = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise TypeError(f"valid must be a bool tensor or None, got {kind}")
            if valid.shape != prompt_ids.shape or valid.device != self._device:
                raise ValueError(
                    f"valid must have the shape of prompt_ids {tuple(prompt_ids.shape)} and be on {self._device}, "
                    f"got shape {tuple(valid.shape)} on {valid.device}"
                )
        self._refuse_compiled_value_checks("update")
        # Convert before checking values: a finite float64 or integer reward can
        # overflow the tracker's dtype. Detach: the state must not join autograd.
        prompt_ids = cast(prompt_ids, torch.int64)
        rewards = cast(rewards, self._dtype)
        if rewards.requires_grad:
            rewards = rewards.detach()
        if self.check_values and prompt_ids.numel() > 0:
            self._check_id_range(prompt_ids)
            self._check_reward_values(rewards)
        return prompt_ids, rewards, valid

    def _check_reward_values(self, rewards: torch.Tensor) -> None:
        """Raises ValueError unless every reward is finite (one host sync).

        Args:
            rewards: ``dtype`` [N], N >= 1.
        """
        # A sum is finite when every reward is, unless finite rewards overflow
        # it: only then is the exact, slower check needed.
        if not math.isfinite(rewards.sum(dtype=self._compute_dtype).item()):
            finite = torch.isfinite(rewards)
            if not finite.all():
                raise ValueError(
                    f"rewards must be finite in {self._dtype}, got {int((~finite).sum())} NaN or infinite value(s)"
                )

    def _validate_prompt_ids(self, prompt_ids: torch.Tensor, method: str) -> torch.Tensor:
        """Checks ids given to ``stats`` or ``fallback_mask`` as ``update`` checks its own.

        Args:
            prompt_ids: as passed to ``method``.
            method: the public method's name, for the messages.

        Returns:
            int64 [M] ids on ``device``.

        Raises:
            TypeError: if ``prompt_ids`` is not an integer tensor.
            ValueError: if it is not 1-D, is on another device or (with
                ``check_values``) holds an id outside [0, P).
        """
        if not isinstance(prompt_ids, torch.Tensor):
            raise TypeError(f"{method}: prompt_ids must be a torch tensor, got {type(prompt_ids).__name__}")
        if prompt_ids.ndim != 1:
            raise ValueError(f"{method}: prompt_ids must be a 1-D tensor [M], got shape {tuple(prompt_ids.shape)}")
        if not is_integer_dtype(prompt_ids.dtype):
            raise TypeError(f"{method}: prompt_ids must be an integer tensor, got dtype {prompt_ids.dtype}")
        if prompt_ids.device != self._device:
            raise ValueError(
                f"{method}: prompt_ids must be on the tracker's device {self._device}, got {prompt_ids.device}"
            )
        self._refuse_compiled_value_checks(method)
        prompt_ids = prompt_ids.long()
        if self.check_values and prompt_ids.numel() > 0:
            self._check_id_range(prompt_ids)
        return prompt_ids

    def _check_id_range(self, prompt_ids: torch.Tensor) -> None:
        """Raises ValueError unless every id lies in [0, P) (one host sync).

        Args:
            prompt_ids: int64 [M], M >= 1.
        """
        low, high = (bound.item() for bound in torch.aminmax(prompt_ids))
        if low < 0 or high >= self._num_prompts:
            raise ValueError(f"prompt_ids must lie in [0, {self._num_prompts}), got values from {low} to {high}")

    def _refuse_compiled_value_checks(self, method: str) -> None:
        """Raises a clear error when ``method`` is traced by torch.compile with value checks on.

        The value checks read tensors back to the host, which a full graph
        cannot hold; without this, dynamo fails with a cryptic message about
        a data-dependent symbol.

        Args:
            method: the public method being traced, for the message.
        """
        if self.check_values and is_compiling():
            raise ValueError(
                f"{type(self).__name__}.{method} cannot be compiled with check_values=True: the value checks "
                "read ids and rewards back to the host. Build the tracker with check_values=False (or set "
                "tracker.check_values = False) before torch.compile; shapes, dtypes and devices stay checked."
            )


def check_count_range(name: str, count: torch.Tensor, high: Optional[int] = None) -> None:
    """Raises ValueError unless every count lies in [0, high] (or is >= 0).

    Args:
        name: the tracker class name, for the message.
        count: int64 [P], a candidate ``count`` state.
        high: the largest count allowed, or None for no upper bound.
    """
    if count.numel() and (count.min() < 0 or (high is not None and count.max() > high)):
        bound = f"[0, {high}]" if high is not None else ">= 0"
        raise ValueError(
            f"{name} state 'count' must lie in {bound}, got values from {int(count.min())} to {int(count.max())}"
        )
