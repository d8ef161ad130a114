"""Stable integer ids for prompt strings, so trainers can feed text prompts."""

from __future__ import annotations

import itertools
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from rail_interview.stat_tracking.types import Device, resolve_device
from rail_interview.stat_tracking.validation import check_positive_int


class PromptIndexFullError(ValueError):
    """Raised when new prompts would take a PromptIndex past its capacity."""


class PromptIndex:
    """Maps prompt strings to ids in [0, capacity), first come, first served.

    A prompt keeps its id for the life of the index (and across
    ``state_dict`` / ``load_state_dict``), so ids can index a tracker built
    with ``num_prompts=capacity``.

    Across ``torch.distributed`` ranks, pass ``process_group``: ``ids`` is
    then a collective that every rank of the group must call, each with its
    own batch (batches may differ in size, and may be empty). Each rank finds
    its batch's new prompts in first-seen order, the ranks all-gather those
    lists (one host-side ``all_gather_object`` per call), and every rank
    numbers them in rank order, then in each rank's first-seen order, so the
    same prompt gets the same id on every rank and every rank's
    ``state_dict`` is identical, equal to one process's fed the batches
    concatenated in rank order. Bad input or a full index raises on every
    rank and leaves every rank's index unchanged. Every rank must start from
    the same state (load the same ``state_dict`` on every rank). Prefer a
    gloo group, e.g. ``dist.new_group(backend="gloo")``, even when the
    trackers use NCCL: with an NCCL group, ``all_gather_object`` goes
    through the GPU and needs ``torch.cuda.set_device`` to have been called
    for this rank's GPU.

    Without a process group while ``torch.distributed`` runs several ranks,
    each rank numbers its own prompts and the same id means different
    prompts on different ranks; ``ids`` warns once per index (a UserWarning)
    in that case.

    Args:
        capacity: the most distinct prompts; use the tracker's ``num_prompts``.
        device: where the id tensors returned by ``ids`` are created.
        process_group: a ``torch.distributed`` process group whose ranks
            share the ids, or None for ids of this process alone.

    Example:
        >>> index = PromptIndex(capacity=3)
        >>> index.ids(["a cat", "a dog", "a cat"])
        tensor([0, 1, 0])
        >>> index.prompt(1), len(index)
        ('a dog', 2)
    """

    def __init__(
        self,
        capacity: int,
        *,
        device: Device = None,
        process_group: Optional["dist.ProcessGroup"] = None,
    ) -> None:
        check_positive_int("capacity", capacity)
        self._capacity = capacity
        self._device = resolve_device(device)
        self._process_group = process_group
        self._warned_unshared = False
        self._ids: Dict[str, int] = {}
        self._prompts: List[str] = []

    @property
    def capacity(self) -> int:
        """The most distinct prompts this index holds."""
        return self._capacity

    @property
    def process_group(self) -> Optional["dist.ProcessGroup"]:
        """The process group whose ranks share this index's ids, or None."""
        return self._process_group

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._ids

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Returns the id of each prompt, giving new prompts the next free ids.

        Either all new prompts of the call (of every rank's call, with a
        process group) get ids or, if they do not fit, none does. With a
        process group this is a collective: every rank of the group must
        call it, with its own batch.

        Args:
            prompts: [N] prompt strings; N may differ between ranks.

        Returns:
            int64 [N] ids on the index's device.

        Raises:
            TypeError: if ``prompts`` is a single string or holds a
                non-string; with a process group, on every rank when any
                rank's input is refused (the others name that rank).
            PromptIndexFullError: if the new prompts (of all ranks) do not
                fit in ``capacity``; with a process group, on every rank.
            ValueError: with a process group, if the ranks' indexes hold
                different numbers of prompts (they were not loaded alike).
        """
        error: Optional[TypeError] = None
        try:
            prompts = _check_prompts(prompts)
        except TypeError as caught:
            if self._process_group is None:
                raise
            error = caught
        new = None if error is not None else [p for p in dict.fromkeys(prompts) if p not in self._ids]
        if self._process_group is None:
            self._warn_if_unshared()
        else:
            new = self._gather_new(new, error)
        if len(self._prompts) + len(new) > self._capacity:
            raise PromptIndexFullError(
                f"PromptIndex is full: {len(self._prompts)} of {self._capacity} ids taken and this call "
                f"brings {len(new)} new prompt(s), e.g. {new[0]!r}. Build the index and the tracker "
                "with a larger num_prompts."
            )
        for prompt in new:
            self._ids[prompt] = len(self._prompts)
            self._prompts.append(prompt)
        return torch.tensor([self._ids[p] for p in prompts], dtype=torch.int64, device=self._device)

    def _gather_new(self, new: Optional[List[str]], error: Optional[TypeError]) -> List[str]:
        """Every rank's new prompts (None where refused), merged in rank order."""
        group = self._process_group
        # Each rank's (prompts held, new prompts or None if its input was refused),
        # in placeholders that all_gather_object overwrites.
        world_size = dist.get_world_size(group)
        gathered: List[Tuple[int, Optional[List[str]]]] = [(0, None)] * world_size  # pragma: no mutate (placeholder)
        dist.all_gather_object(gathered, (len(self._prompts), new), group=group)
        if error is not None:
            raise error
        refused = [rank for rank, (_, rank_new) in enumerate(gathered) if rank_new is None]
        if refused:
            raise TypeError(f"PromptIndex.ids refused the prompts of rank(s) {refused}; see the error there")
        sizes = [size for size, _ in gathered]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"PromptIndex holds different numbers of prompts on different ranks, {sizes}: "
                "load the same state_dict on every rank"
            )
        return [p for p in dict.fromkeys(itertools.chain.from_iterable(n for _, n in gathered)) if p not in self._ids]

    def _warn_if_unshared(self) -> None:
        """Warns once if several ranks run but this index numbers for itself."""
        if self._warned_unshared or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() > 1:
            self._warned_unshared = True
            warnings.warn(
                f"PromptIndex without a process_group while torch.distributed runs {dist.get_world_size()} "
                "ranks: each rank numbers its own prompts, so the same id means different prompts on "
                "different ranks. Pass process_group= (e.g. dist.new_group(backend='gloo')) so that ids "
                "agree across ranks, or ignore this if each rank has its own tracker with no process group.",
                UserWarning,
                stacklevel=3,
            )

    def prompt(self, prompt_id: int) -> str:
        """Returns the prompt string that has ``prompt_id``.

        Args:
            prompt_id: an id returned by ``ids``.

        Returns:
            The prompt.

        Raises:
            KeyError: if no prompt has that id yet.
        """
        if not 0 <= prompt_id < len(self._prompts):
            raise KeyError(f"no prompt has id {prompt_id}; {len(self._prompts)} ids are taken")
        return self._prompts[prompt_id]

    def state_dict(self) -> Dict[str, List[str]]:
        """Returns the prompts in id order, for checkpoints.

        Returns:
            ``{"prompts": [...]}``, a list of strings (loadable with
            ``torch.load(..., weights_only=True)``); identical on every rank
            of a process group.
        """
        return {"prompts": list(self._prompts)}

    def load_state_dict(self, state_dict: Mapping[str, List[str]]) -> None:
        """Restores the prompts and their ids from ``state_dict``.

        Each prompt gets back the id it had (its position in the saved list).
        No collective: with a process group, load the same state on every
        rank.

        Args:
            state_dict: as returned by ``state_dict``.

        Raises:
            ValueError: if it is malformed, holds duplicates or exceeds the
                capacity; the index is then unchanged.
        """
        prompts = state_dict.get("prompts") if isinstance(state_dict, Mapping) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("PromptIndex state must be {'prompts': [str, ...]}")
        if len(set(prompts)) != len(prompts) or len(prompts) > self._capacity:
            raise ValueError(
                f"PromptIndex state must hold at most {self._capacity} distinct prompts, got {len(prompts)} "
                f"({len(set(prompts))} distinct)"
            )
        self._prompts = list(prompts)
        self._ids = {p: i for i, p in enumerate(prompts)}


def _check_prompts(prompts: Sequence[str]) -> List[str]:
    """Returns ``prompts`` as a list, or raises TypeError if they are not strings."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got the single string {prompts!r}")
    prompts = list(prompts)
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
    return prompts
