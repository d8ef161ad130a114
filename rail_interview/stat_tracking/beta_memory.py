"""A discounted pass count per prompt: the Beta posterior that SPO keeps.

With rewards in [0, 1] (pass/fail, or fractional scores), a prompt's pass
rate is estimated by a Beta distribution with parameters alpha (discounted
successes) and beta (discounted failures). Each reward r, with a discount
rho in (0, 1], updates them as

    alpha <- rho * alpha + r,    beta <- rho * beta + (1 - r),

so the estimate ``p = alpha / (alpha + beta)`` follows a moving pass rate,
and ``alpha + beta`` (at most ``1 / (1 - rho)`` plus the prior's weight)
says how much evidence stands behind it. This is the tracker of SPO
(Single-stream Policy Optimization), ``recipe/spo/spo_ray_trainer.py`` in
verl's recipes, with the discount either a constant (``decay``) or one per
sample given at update time (SPO's KL-adaptive rho: ``functional.spo_discount``).

Two rules for a prompt seen several times in one batch (``repeats``):

* ``"all"``: every sample is folded in, in batch order, exactly as one
  reward at a time (a closed form per prompt, as the EMA's).
* ``"last"``: SPO's reference code. Every sample's update is computed from
  the state before the batch, then written in batch order, so the last
  sample's update stands and the others' rewards are lost:
  ``alpha <- rho_last * alpha + r_last``.

Statistics handed to the estimator: mean ``p``, std ``sqrt(p (1 - p))``
(the std of a pass/fail reward with pass rate p, whatever ``ddof``) and
count (the valid samples the row has seen since it was reset, those whose
reward ``"last"`` discards included, as SPO counts its prompts' samples).
A row starts at the prior alpha = beta = 0.5 (SPO's without offline data;
Jeffreys'), and ``set_prior`` sets any other before training.

In float16 and bfloat16 state, alpha and beta stop growing where a step of
1 falls below their rounding (2048 in float16, 256 in bfloat16): with rho
close to 1 (or 1) a long history saturates, so keep such a memory in
float32. A long run of equal rewards with a small rho can round alpha or
beta to 0, which the state allows (alpha + beta stays at least 1 after any
reward).

State: ``alpha`` [P], ``beta`` [P] (the tracker's dtype) and ``count`` [P]
(int64). Dimensions: N samples, P prompts, R = P + 1 rows (row P takes the
invalid samples, as in every memory), M prompts asked about.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from rail_interview.stat_tracking.ops import (
    DecayPowers,
    cast,
    compute_dtype,
    group_by_prompt,
    segment_sum,
    take,
    write_at,
)
from rail_interview.stat_tracking.types import SampleStats
from rail_interview.stat_tracking.validation import check_count_range, check_discount

#: The rules for a prompt seen several times in one batch.
REPEATS = ("all", "last")

#: A row's parameters before any reward or ``set_prior``: SPO's prior without offline data.
DEFAULT_PRIOR = 0.5


class BetaMemory:
    """Discounted successes and failures per prompt: a Beta posterior of its pass rate (see the module docstring).

    Args:
        num_prompts: P.
        decay: the discount rho of every reward, in (0, 1] (1: no
            discount, a plain count), unless a per-sample discount is given
            to ``fold``.
        repeats: ``"all"`` or ``"last"``: what a prompt seen several times
            in one batch keeps.
        dtype: floating dtype of alpha and beta.
        device: where the state lives.

    Raises:
        ValueError: if ``decay`` is not in (0, 1] or ``repeats`` is unknown.

    Example:
        >>> memory = BetaMemory(1, 0.5, repeats="all", dtype=torch.float32, device=torch.device("cpu"))
        >>> stats = memory.fold(torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), ddof=0, own_weight=False)
        >>> memory.state_tensors()  # alpha: 0.5 * (0.5 * 0.5 + 1) + 0; beta: 0.5 * (0.5 * 0.5 + 0) + 1
        {'alpha': tensor([0.6250]), 'beta': tensor([1.1250]), 'count': tensor([2])}
    """

    kind = "beta"
    #: The default prior's mean and posterior std: 0.5 and sqrt(0.25 / 2).
    unseen_estimate = (DEFAULT_PRIOR, (DEFAULT_PRIOR * DEFAULT_PRIOR / 2.0) ** 0.5)

    def __init__(
        self, num_prompts: int, decay: float, *, repeats: str = "all", dtype: torch.dtype, device: torch.device
    ) -> None:
        self.decay = check_discount("decay", decay)
        if repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {', '.join(map(repr, REPEATS))}; got {repeats!r}")
        self.repeats = repeats
        self._num_prompts, self._dtype, self._device = num_prompts, dtype, device
        self._compute_dtype = compute_dtype(dtype)
        num_rows = num_prompts + 1
        self._alpha = torch.full((num_rows,), DEFAULT_PRIOR, dtype=dtype, device=device)  # [R]
        self._beta = torch.full((num_rows,), DEFAULT_PRIOR, dtype=dtype, device=device)  # [R]
        self._count = torch.zeros(num_rows, dtype=torch.int64, device=device)  # [R]
        self._powers = DecayPowers(self.decay, scale=1.0, dtype=self._compute_dtype, device=device)

    def _stored(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha and beta of some rows, in the compute dtype."""
        compute = self._compute_dtype
        return cast(take(self._alpha, rows), compute), cast(take(self._beta, rows), compute)

    def fold(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        *,
        ddof: int,
        own_weight: bool,
        discount: Optional[torch.Tensor] = None,
    ) -> SampleStats:
        """Folds the batch into alpha and beta and returns the statistics after it (see ``Memory.fold``).

        Args:
            prompt_ids: int64 [N], ids in [0, P]; P marks an invalid sample.
            rewards: float [N] in the compute dtype, in [0, 1].
            ddof: unused: the Beta memory's std is ``sqrt(p (1 - p))``.
            own_weight: whether to compute each reward's weight in p.
            discount: float [N] in (0, 1], each sample's rho, or None for ``decay``.

        Returns:
            The batch's ``SampleStats``, in sorted order.
        """
        del ddof
        groups = group_by_prompt(prompt_ids, self._num_prompts + 1)  # pragma: no mutate (spare)
        sorted_ids = groups.sorted_ids  # [N]
        sorted_rewards = take(rewards, groups.order)  # [N]
        rho = None if discount is None else take(discount, groups.order)  # [N]
        old_alpha, old_beta = self._stored(sorted_ids)  # [N], [N]
        if self.repeats == "last":
            last = groups.end - 1  # [N], the group's last sample
            reward = take(sorted_rewards, last)  # [N]
            kept = self.decay if rho is None else take(rho, last)  # rho of the last sample
            alpha = old_alpha * kept + reward  # [N]
            beta = old_beta * kept + (1.0 - reward)  # [N]
            weight = (groups.position == last).to(rewards.dtype)  # [N], only the last reward counts
        else:
            weight, kept = self._weights(groups, rho, rewards.dtype)  # [N], [N]
            alpha = old_alpha * kept + segment_sum(weight * sorted_rewards, groups)  # [N]
            beta = old_beta * kept + segment_sum(weight * (1.0 - sorted_rewards), groups)  # [N]
        count = take(self._count, sorted_ids) + groups.size  # [N]
        write_at(self._alpha, sorted_ids, alpha)
        write_at(self._beta, sorted_ids, beta)
        write_at(self._count, sorted_ids, count)
        total = alpha + beta  # [N]
        mean = alpha / total  # [N]
        own = weight / total if own_weight else None  # [N], the reward's weight in alpha / (alpha + beta)
        return SampleStats(sorted_rewards, count, sorted_rewards - mean, bernoulli_std(mean), own, groups)

    def _weights(self, groups, rho: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each sorted sample's weight in the fold (the product of the later samples' rho) and the group's rho product.

        With a constant rho the weights are its powers, as the EMA's. With one
        rho per sample they are sums of logarithms within the group, taken in
        float64: differences of one cumulative sum over the batch, whose
        rounding would otherwise grow with the batch.

        Returns:
            float [N] weights and float [N] products, in ``dtype``.
        """
        if rho is None:  # decay ** (later samples of the group), decay ** (the group's samples)
            return tuple(cast(power, dtype) for power in self._powers.fold_weights(groups, groups.size))
        # A rho of 0 (refused with value checks) forgets everything: the smallest float64 stands in for it,
        # so that no -inf enters the cumulative sum and reaches other prompts' groups.
        logs = torch.log(rho.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))  # [N]
        through = torch.cumsum(logs, 0)  # [N], inclusive; pragma: no mutate (dim)
        group_through = take(through, groups.end - 1)  # [N], through the group's last sample
        before = take(through, groups.start) - take(logs, groups.start)  # [N], before the group's first
        weight = torch.exp(group_through - through)  # [N], rho of the later samples
        return weight.to(dtype), torch.exp(group_through - before).to(dtype)

    def read(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int) -> SampleStats:
        """Each sample's statistics as the memory holds them before the batch, in batch order.

        Args:
            prompt_ids: int64 [N], ids in [0, P].
            rewards: float [N] in the compute dtype.
            ddof: unused (see ``fold``).

        Returns:
            ``SampleStats`` in batch order, with ``own_weight`` zero (the
            sample's reward is not in its statistics yet).
        """
        del ddof
        alpha, beta = self._stored(prompt_ids)
        mean = alpha / (alpha + beta)  # [N]
        count = take(self._count, prompt_ids)
        return SampleStats(rewards, count, rewards - mean, bernoulli_std(mean), torch.zeros_like(rewards), None)

    def estimate(self, prompt_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pass rate, its posterior std and the count of some prompts (see ``types.PromptQuery``).

        Args:
            prompt_ids: int64 [M], ids in [0, P).

        Returns:
            ``dtype`` [M] ``alpha / (alpha + beta)``, ``dtype`` [M]
            ``sqrt(alpha beta / ((alpha + beta)**2 (alpha + beta + 1)))``
            and int64 [M] counts, all new tensors.
        """
        alpha, beta = self._stored(prompt_ids)
        total = alpha + beta
        mean = alpha / total
        spread = torch.sqrt(alpha * beta / (total.square() * (total + 1.0)))
        return mean.to(self._dtype), spread.to(self._dtype), take(self._count, prompt_ids)

    def set_prior(self, rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Sets some rows' alpha and beta and zeroes their count (no host sync).

        Args:
            rows: int64 [M], distinct rows in [0, P].
            alpha: float [M], positive.
            beta: float [M], positive.
        """
        write_at(self._alpha, rows, alpha)
        write_at(self._beta, rows, beta)
        self._count.index_fill_(0, rows, 0)

    def counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Valid samples each given prompt's row has seen since it was reset (see ``Memory.counts``)."""
        return take(self._count, prompt_ids)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Puts some rows back to the default prior, count 0 (see ``Memory.reset_rows``)."""
        self._alpha.index_fill_(0, rows, DEFAULT_PRIOR)
        self._beta.index_fill_(0, rows, DEFAULT_PRIOR)
        self._count.index_fill_(0, rows, 0)

    def snapshot(self, prompt_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns alpha, beta and count of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"alpha": [M], "beta": [M], "count": [M]}``.
        """
        state = self.state_tensors()
        if prompt_ids is None:
            return state
        return {name: tensor[prompt_ids] for name, tensor in state.items()}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """``p = alpha / (alpha + beta)`` as the mean, ``sqrt(p (1 - p))`` as the std (the prior's at first)."""
        compute = self._compute_dtype
        alpha, beta = snapshot["alpha"].to(compute), snapshot["beta"].to(compute)
        mean = alpha / (alpha + beta)
        return mean.to(self._dtype), bernoulli_std(mean).to(self._dtype), snapshot["count"].clone()

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """``alpha`` [P], ``beta`` [P] and ``count`` [P]: views of rows [0, P) of the live state."""
        return {"alpha": self._alpha[:-1], "beta": self._beta[:-1], "count": self._count[:-1]}

    def assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked state into rows [0, P) of the live state (see ``Memory.assign_state``)."""
        for name, tensor in self.state_tensors().items():
            tensor.copy_(state[name])

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Refuses negative counts, alpha or beta not finite or negative, and alpha + beta not positive."""
        check_count_range(name, state["count"])
        for parameter in ("alpha", "beta"):
            values = state[parameter]
            if not (torch.isfinite(values).all() and (values >= 0).all()):
                raise ValueError(f"{name} state {parameter!r} must be finite and non-negative")
        if not (state["alpha"].to(torch.float64) + state["beta"].to(torch.float64) > 0).all():
            raise ValueError(f"{name} state 'alpha' + 'beta' must be positive (a Beta distribution needs weight)")


def bernoulli_std(mean: torch.Tensor) -> torch.Tensor:
    """``sqrt(p (1 - p))``: the std of a reward in {0, 1} that passes with probability p.

    Args:
        mean: float [N], p in [0, 1].

    Returns:
        float [N]; 0 at p = 0 and p = 1.
    """
    return torch.sqrt((mean * (1.0 - mean)).clamp_min(0.0))
