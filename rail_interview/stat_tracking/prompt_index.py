"""Stable integer ids for prompt strings, so trainers can feed text prompts."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from rail_interview.stat_tracking.base import Device, check_positive_int, resolve_device


class PromptIndexFullError(ValueError):
    """Raised when new prompts would take a PromptIndex past its capacity."""


class PromptIndex:
    """Maps prompt strings to ids in [0, capacity), first come, first served.

    A prompt keeps its id for the life of the index (and across
    ``state_dict`` / ``load_state_dict``), so ids can index a tracker built
    with ``num_prompts=capacity``.

    Args:
        capacity: the most distinct prompts; use the tracker's ``num_prompts``.
        device: where the id tensors returned by ``ids`` are created.

    Example:
        >>> index = PromptIndex(capacity=3)
        >>> index.ids(["a cat", "a dog", "a cat"])
        tensor([0, 1, 0])
        >>> index.prompt(1), len(index)
        ('a dog', 2)
    """

    def __init__(self, capacity: int, *, device: Device = None) -> None:
        check_positive_int("capacity", capacity)
        self._capacity = capacity
        self._device = resolve_device(device)
        self._ids: Dict[str, int] = {}
        self._prompts: List[str] = []

    @property
    def capacity(self) -> int:
        """The most distinct prompts this index holds."""
        return self._capacity

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._ids

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Returns the id of each prompt, giving new prompts the next free ids.

        Either all new prompts of the call get ids or, if they do not fit,
        none does.

        Args:
            prompts: [N] prompt strings.

        Returns:
            int64 [N] ids on the index's device.

        Raises:
            TypeError: if ``prompts`` is a single string or holds a non-string.
            PromptIndexFullError: if the new prompts do not fit in ``capacity``.
        """
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a sequence of strings, got the single string {prompts!r}")
        prompts = list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        new = [p for p in dict.fromkeys(prompts) if p not in self._ids]
        if len(self._prompts) + len(new) > self._capacity:
            raise PromptIndexFullError(
                f"PromptIndex is full: {len(self._prompts)} of {self._capacity} ids taken and this batch "
                f"brings {len(new)} new prompt(s), e.g. {new[0]!r}. Build the index and the tracker "
                "with a larger num_prompts."
            )
        for prompt in new:
            self._ids[prompt] = len(self._prompts)
            self._prompts.append(prompt)
        return torch.tensor([self._ids[p] for p in prompts], dtype=torch.int64, device=self._device)

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
            ``torch.load(..., weights_only=True)``).
        """
        return {"prompts": list(self._prompts)}

    def load_state_dict(self, state_dict: Mapping[str, List[str]]) -> None:
        """Restores the prompts and their ids from ``state_dict``.

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
