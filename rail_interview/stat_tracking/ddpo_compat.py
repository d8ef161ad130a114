"""A drop-in for ddpo-pytorch's ``PerPromptStatTracker``, backed by a hashed tensor tracker.

ddpo-pytorch (kvablack/ddpo-pytorch, ``ddpo_pytorch/stat_tracking.py``) keys
a Python dict of deques by prompt string and loops over the batch's prompts
on the host. This class has its exact call signature, so that a DDPO
trainer changes one import line::

    # from ddpo_pytorch.stat_tracking import PerPromptStatTracker
    from rail_interview.stat_tracking.ddpo_compat import PerPromptStatTracker

    stat_tracker = PerPromptStatTracker(config.per_prompt_stat_tracking.buffer_size,
                                        config.per_prompt_stat_tracking.min_count)
    advantages = stat_tracker.update(prompts, rewards)   # np.ndarray in, np.ndarray out

Behind it, ``prompt_keys`` hashes the strings and ``presets.ddpo(...,
keys="hashed")`` computes the advantages with ddpo-pytorch's semantics (see
``presets.ddpo``), on any device.
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

from rail_interview.stat_tracking.keys import prompt_keys
from rail_interview.stat_tracking.presets import ddpo
from rail_interview.stat_tracking.types import Device

__all__ = ["PerPromptStatTracker"]


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt stat tracker: same constructor, ``update`` and ``get_stats``.

    ``update(prompts, rewards)`` appends each prompt's rewards to its last
    ``buffer_size`` and returns ``(reward - mean) / (std + 1e-6)`` with the
    prompt's mean and population std, or the whole batch's while the prompt
    holds fewer than ``min_count`` rewards, exactly as ddpo-pytorch does.

    Departures from ddpo-pytorch:

    * Memory is bounded: the tracker remembers the ``num_prompts`` prompts
      seen most recently (65,536 by default); a prompt evicted for newer
      ones starts over. ddpo-pytorch's dict grows without bound.
    * Statistics are computed in ``dtype`` (float64 by default, on the
      device); the advantages come back in the rewards' floating dtype.
      ddpo-pytorch computes in the rewards' dtype, so float32 rewards agree
      to about 1e-6 relative, float64 ones to rounding; integer rewards give
      float64 advantages here and truncated integers there.
    * ``get_stats`` lists prompts in the tracker's row order, not first-seen
      order, and gives Python floats and ints.
    * Prompts are keyed by a 64-bit hash of their text (``prompt_keys``), so
      two prompts collide with probability about 2**-64 per pair.

    Args:
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        num_prompts: the most prompts remembered.
        device: where the tracker's state lives.
        dtype: floating dtype of the state and the statistics.

    Example:
        >>> tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
        >>> tracker.update(np.array(["a cat", "a cat", "a dog"]), np.array([1.0, 3.0, 10.0])).round(4)
        array([-1.    ,  1.    ,  1.3822])
        >>> tracker.get_stats()["a cat"]["count"]
        2
    """

    def __init__(
        self,
        buffer_size: int,
        min_count: int,
        *,
        num_prompts: int = 65536,
        device: Device = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self._tracker = ddpo(num_prompts, buffer_size, min_count, keys="hashed", device=device, dtype=dtype)
        self._prompts: Dict[int, str] = {}  # key -> prompt, for get_stats

    @property
    def tracker(self):
        """The ``AdvantageTracker`` behind this object (hashed keys), e.g. for ``state_dict``."""
        return self._tracker

    def update(
        self, prompts: Union[Sequence[str], np.ndarray], rewards: Union[Sequence[float], np.ndarray]
    ) -> np.ndarray:
        """Adds a batch of rewards and returns its advantages, as ddpo-pytorch's ``update``.

        Args:
            prompts: [N] prompt strings (a list or a numpy array of str).
            rewards: [N] rewards (a list or a numpy array).

        Returns:
            np.ndarray [N] of the rewards' floating dtype (float64 for
            integer rewards): the advantages.

        Raises:
            ValueError: if the lengths differ or a reward is not finite.
        """
        texts = [str(prompt) for prompt in np.asarray(prompts).reshape(-1).tolist()]
        rewards = np.asarray(rewards)
        if rewards.shape != (len(texts),):
            raise ValueError(
                f"prompts and rewards must be 1-D of one length, got {len(texts)} prompts and rewards "
                f"of shape {rewards.shape}"
            )
        keys = prompt_keys(texts, device=self._tracker.device)
        self._prompts.update(zip(keys.tolist(), texts))
        values = torch.as_tensor(rewards.astype(np.float64), device=self._tracker.device)
        advantages = self._tracker.update(keys, values).cpu().numpy()
        if len(self._prompts) > 2 * self._tracker.num_prompts:
            self._forget_evicted()
        out_dtype = rewards.dtype if np.issubdtype(rewards.dtype, np.floating) else np.float64
        return advantages.astype(out_dtype)

    def get_stats(self) -> Dict[str, Dict[str, Union[float, int]]]:
        """Mean, population std and count of every remembered prompt, as ddpo-pytorch's ``get_stats``.

        The state dict holds keys, not text: after ``tracker.load_state_dict``
        a prompt not seen since is listed as ``"<prompt key K>"`` (K its
        int64 key, ``prompt_keys`` of its text) until ``update`` sees it again.

        Returns:
            ``{prompt: {"mean": float, "std": float, "count": int}}``.
        """
        keys, used = self._tracker.table_keys()
        stats = self._tracker.stats()
        rows = used.nonzero().squeeze(1)
        return {
            self._prompts.get(key, f"<prompt key {key}>"): {"mean": mean, "std": std, "count": count}
            for key, mean, std, count in zip(
                keys[rows].tolist(), stats.mean[rows].tolist(), stats.std[rows].tolist(), stats.count[rows].tolist()
            )
        }

    def _forget_evicted(self) -> None:
        """Drops the text of prompts the tracker no longer remembers."""
        keys, used = self._tracker.table_keys()
        self._prompts = {key: self._prompts[key] for key in keys[used].tolist() if key in self._prompts}
