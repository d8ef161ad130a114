"""Plain transcriptions of public systems' advantage code for several rewards per sample and weighted samples.

The companion of ``tests/system_references.py`` for issue 24 (R3 4/5): each
function is written as its source is (the same calls, loops and constants,
in the same order), for a flat batch given as N prompt ids, rewards ``[N, C]``
(C reward functions) and, for verl, a response mask ``[N, T]``. A group is
the samples of one id, in any positions of the batch. What had to change is
said in each docstring, under "Interpretations".

Sources (read in full before transcribing):

* TRL 1.16.0 as installed from PyPI (``trl/trainer/grpo_trainer.py``,
  ``GRPOTrainer._generate_and_score_completions``, the lines from
  ``unscorable_mask = ...`` to ``advantages = torch.nan_to_num(...)``, and
  ``trl/trainer/utils.py``, ``nanstd``). Both are byte-identical to
  huggingface/trl commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (main,
  2026-07-24; lines 2679 to 2730), the newest snapshot stored here; the
  wheel's own commit is not recorded in its metadata. ``normalize_then_sum``
  came in 0e0cb5f1584c92629abd5a5a5a7f2cfa9cc9b73e (#4785), the all-None row
  rule in 1c7c7f9889b1087b51cffa1906cff603c7fdd61d (#5902).
* verl 0.9.1 as installed from PyPI (``verl/trainer/ppo/core_algos.py``,
  ``compute_gdpo_outcome_advantage``, ``compute_grpo_outcome_advantage``,
  ``compute_opo_outcome_advantage``; ``verl/utils/torch_functional.py``,
  ``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten``).
  These functions are byte-identical to verl-project/verl tag v0.9.0
  (483b8a009ba3a97563edee3a19887e4862b8094a) and to main at
  1dda039b9c6311889a9c9a26040677e1254814f9 (2026-08-22); GDPO came in
  b560d9f4213307d2d9616e5a6eb5209582f737ec (#5503).
* verl's vectorised GRPO before and after PR #6348
  (``verl/utils/groupwise.py``, ``group_mean_std``; ``core_algos.py``,
  ``compute_grpo_vectorized_outcome_advantage``): the fix is commit
  1cc810c1ad858b70fddbaac401235b8c6b8fa5e6, the buggy code is at its parent
  9874bea010c57d7d97096d42ddea1795916e5fb8.
"""

from collections import defaultdict
from typing import Dict, Hashable, List, Optional, Sequence, Union

import torch

from system_references import verl_grpo_scores

#: TRL's epsilon, added to every std it divides by (``std + 1e-4``).
TRL_EPS = 1e-4


def _groups(prompts: Sequence[Hashable]) -> Dict[Hashable, List[int]]:
    """The positions of each prompt id, in order of first appearance."""
    groups: Dict[Hashable, List[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    return groups


# TRL -----------------------------------------------------------------------------------------------


def trl_nanstd(
    tensor: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False, *, exact_bessel: bool = False
) -> torch.Tensor:
    """TRL ``trl/trainer/utils.py``, ``nanstd`` (commit f2cd57710ae345ea6428ae95363267fcf38a3dc8, trl 1.16.0).

    In order: the ``nanmean`` of the tensor; the ``nanmean`` of the squared
    deviations (population variance of the non-NaN values); times
    ``count / (count - 1)`` (Bessel), where the factor is NaN when
    ``count <= 1``; the square root. So one non-NaN value, or none, gives
    NaN, and NaN entries leave every statistic.

    ``count`` is int64, so ``count / (count - 1)`` is a float32 division
    (torch's default dtype) even for float64 input: 4 / 3 is 1.33333337, and
    TRL's float64 std of 4 values is off by 1.5e-8 relative from the exact
    one (exact for counts 2, 3, 5, 9, 17, ...). Kept as TRL has it, unless
    ``exact_bessel``.

    Interpretations: ``dim`` is one int or None here (TRL also takes a tuple);
    the squeeze at the end is TRL's for those two cases.

    A departure on request only: ``exact_bessel=True`` takes the factor in
    the tensor's dtype, ``count.to(dtype) / (count.to(dtype) - 1)``, so that
    a float64 std is float64-exact. That one constant is all it changes; the
    default (False) is TRL's code.

    Args:
        tensor: the values, NaN for missing ones.
        dim: the dimension to reduce, or None for all.
        keepdim: keep the reduced dimension.
        exact_bessel: the Bessel factor in the tensor's dtype instead of
            TRL's float32 one.

    Returns:
        The sample std of the non-NaN values.
    """
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    if exact_bessel:
        count = count.to(tensor.dtype)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    if dim is None:
        return std.squeeze()
    return std.squeeze(dim)


def trl_grpo_multi_raw_advantages(
    prompts: Sequence[Hashable],
    rewards: Sequence[Sequence[float]],
    reward_weights: Optional[Sequence[float]] = None,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    dtype: torch.dtype = torch.float64,
    *,
    exact_bessel: bool = False,
) -> torch.Tensor:
    """TRL ``GRPOTrainer._generate_and_score_completions``'s advantages with C reward functions, before ``nan_to_num``.

    Transcribed from ``trl/trainer/grpo_trainer.py`` at huggingface/trl
    commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (= trl 1.16.0), lines
    2679 to 2729. ``rewards_per_func [N, C]`` holds each function's reward,
    NaN where it returned None (``_calculate_rewards``). In order:

    1. ``unscorable_mask``: the rows where every function returned None.
    2. ``"sum_then_normalize"`` (default):

       a. ``rewards = (rewards_per_func * reward_weights).nansum(dim=1)``: a
          NaN channel adds 0 to its row's weighted sum (the row keeps the
          others' rewards); then the unscorable rows are set back to NaN, so
          they leave the baseline and the std.
       b. The group mean: ``torch.nanmean`` over the group's rows.
       c. The std: ``"group"`` and ``"none"``: ``nanstd`` over the group's
          rows (Bessel; NaN with one non-NaN row or none; ``"none"`` only
          logs it); ``"batch"``: ``nanstd`` over all N rows, NaN rows left
          out (NaN if one row is non-NaN).
       d. ``advantages = rewards - group mean``, divided by ``std + 1e-4``
          unless ``"none"``.

    3. ``"normalize_then_sum"``:

       a. Per group and per channel: ``mean_k = nanmean`` and ``std_k =
          nanstd`` of the channel's rewards in the group (Bessel; NaN with
          at most one non-NaN reward), ``reward_k = (r - mean_k) / (std_k +
          1e-4)``. NaN stays NaN where the reward was None, and for the
          whole group in a channel with at most one non-NaN reward.
       b. ``rewards = (reward_k * reward_weights).nansum(dim=1)``: NaN
          channels add 0; then the unscorable rows (all raw rewards None)
          are set to NaN. A row with rewards whose every normalised channel
          is NaN (each channel had one non-NaN reward in its group) gets 0,
          not NaN, and enters the batch statistics as 0.
       c. Over the batch, whatever ``scale_rewards`` says:
          ``(rewards - nanmean(rewards)) / (nanstd(rewards) + 1e-4)``; the
          std is that of all non-NaN rows (Bessel), NaN if one.

    ``trl_grpo_multi_advantages`` then applies TRL's last step,
    ``torch.nan_to_num(advantages, nan=0.0)``: every NaN left here becomes
    0 (unscorable rows, groups with one scorable row under ``"group"``, the
    whole batch when it has one scorable row under ``"batch"`` or
    ``"normalize_then_sum"``).

    Interpretations:

    * Groups are the rows of one prompt id, in any positions and of any
      sizes. TRL's are contiguous blocks of ``num_generations`` rows, all of
      one size (``rewards.view(-1, num_generations)``); on such a batch the
      two are the same computation. TRL's ``if num_generations > 1 ...
      else zeros`` is applied per group: a group of one gets std 0 (TRL's
      ``num_generations == 1`` branch) instead of ``nanstd``'s NaN; both
      give advantage 0 after ``nan_to_num`` (``(r - r) / 1e-4`` or NaN).
    * ``dtype`` is that of the rewards and the weights (TRL's are float32:
      ``rewards_per_func`` is allocated float32 and ``reward_weights`` is
      ``torch.tensor(..., dtype=torch.float32)``); the 1e-4 is a Python
      float, so in float64 it is 1e-4 exactly.
    * ``reward_weights=None`` means TRL's default, ones.
    * Not an interpretation but worth knowing: every ``nanstd`` here has
      TRL's float32 Bessel factor (see ``trl_nanstd``), so float64 results
      are not float64-exact where a count n has n / (n - 1) inexact in
      float32. ``exact_bessel=True`` (not TRL's code: a test aid) passes
      ``exact_bessel`` to every ``trl_nanstd``, which then takes that one
      factor in ``dtype``; nothing else changes.

    Args:
        prompts: [N] prompt ids.
        rewards: [N, C] rewards, NaN where a function returned None.
        reward_weights: [C] weights, or None for ones.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        dtype: the computation's dtype.
        exact_bessel: the Bessel factors in ``dtype`` instead of TRL's float32 ones.

    Returns:
        [N] advantages of ``dtype``, NaN where TRL's are NaN before ``nan_to_num``.
    """
    rewards_per_func = torch.tensor([list(row) for row in rewards], dtype=dtype)
    num_funcs = rewards_per_func.shape[1]
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=dtype)
    else:
        weights = torch.tensor(list(reward_weights), dtype=dtype)
    groups = _groups(prompts)

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)

    if multi_objective_aggregation == "sum_then_normalize":
        rewards_sum = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards_sum[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.empty_like(rewards_sum)
        for samples in groups.values():
            mean_grouped_rewards[samples] = torch.nanmean(rewards_sum[samples])
        if scale_rewards in ["group", "none"]:
            std_rewards = torch.empty_like(rewards_sum)
            for samples in groups.values():
                if len(samples) > 1:
                    std_rewards[samples] = trl_nanstd(rewards_sum[samples], exact_bessel=exact_bessel)
                else:
                    std_rewards[samples] = 0.0
        elif scale_rewards == "batch":
            if rewards_sum.numel() > 1:
                std_rewards = trl_nanstd(rewards_sum, exact_bessel=exact_bessel).expand_as(rewards_sum)
            else:
                std_rewards = torch.zeros_like(rewards_sum)
        else:
            raise ValueError(
                f"Invalid value for scale_rewards: {scale_rewards}. Must be one of 'batch', 'group', or 'none'."
            )
        advantages = rewards_sum - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + TRL_EPS)

    elif multi_objective_aggregation == "normalize_then_sum":
        reward_k = torch.empty_like(rewards_per_func)
        for samples in groups.values():
            grouped = rewards_per_func[samples]  # [n_g, C]
            mean_k = torch.nanmean(grouped, dim=0, keepdim=True)
            if len(samples) > 1:
                std_k = trl_nanstd(grouped, dim=0, keepdim=True, exact_bessel=exact_bessel)
            else:
                std_k = torch.zeros_like(mean_k)
            reward_k[samples] = (grouped - mean_k) / (std_k + TRL_EPS)
        rewards_sum = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
        rewards_sum[unscorable_mask] = torch.nan
        if rewards_sum.numel() > 1:
            std_rewards = trl_nanstd(rewards_sum, exact_bessel=exact_bessel).expand_as(rewards_sum)
        else:
            std_rewards = torch.zeros_like(rewards_sum)
        advantages = (rewards_sum - torch.nanmean(rewards_sum)) / (std_rewards + TRL_EPS)

    else:
        raise ValueError(
            f"Invalid multi_objective_aggregation: {multi_objective_aggregation}. Must be "
            "'sum_then_normalize' or 'normalize_then_sum'."
        )
    return advantages


def trl_grpo_multi_advantages(
    prompts: Sequence[Hashable],
    rewards: Sequence[Sequence[float]],
    reward_weights: Optional[Sequence[float]] = None,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    dtype: torch.dtype = torch.float64,
    *,
    exact_bessel: bool = False,
) -> torch.Tensor:
    """TRL ``GRPOTrainer``'s advantages with C reward functions (commit f2cd57710ae345ea6428ae95363267fcf38a3dc8).

    ``trl_grpo_multi_raw_advantages`` (its docstring says what is done and
    what is interpreted), then TRL's line 2730,
    ``torch.nan_to_num(advantages, nan=0.0)``: NaN becomes 0, and, as
    ``nan_to_num``'s defaults do, +-inf the dtype's largest finite values.

    Args:
        prompts: [N] prompt ids.
        rewards: [N, C] rewards, NaN where a function returned None.
        reward_weights: [C] weights, or None for ones.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        dtype: the computation's dtype.
        exact_bessel: the Bessel factors in ``dtype`` instead of TRL's float32
            ones (a test aid, see ``trl_nanstd``).

    Returns:
        [N] advantages of ``dtype``.
    """
    advantages = trl_grpo_multi_raw_advantages(
        prompts, rewards, reward_weights, scale_rewards, multi_objective_aggregation, dtype, exact_bessel=exact_bessel
    )
    return torch.nan_to_num(advantages, nan=0.0)


# verl: masked statistics ---------------------------------------------------------------------------


def verl_masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl ``verl/utils/torch_functional.py``, ``masked_sum`` with ``axis=None`` (verl 0.9.1, tag v0.9.0 483b8a00).

    ``torch.where(mask.bool(), values, 0.0)`` (a NaN outside the mask cannot
    poison the sum), times the mask, summed.
    """
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum()


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl ``verl/utils/torch_functional.py``, ``masked_mean`` with ``axis=None`` (verl 0.9.1, tag v0.9.0 483b8a00).

    ``masked_sum / (mask.sum() + 1e-8)``. With an integer mask (verl's
    ``response_mask`` comes from the int64 attention mask) ``mask.sum() +
    1e-8`` is a float32 tensor, so the 1e-8 is lost for any sum >= 1; with a
    float64 mask it stays in the denominator (a relative 1e-8 / L bias).
    """
    s = verl_masked_sum(values, mask)
    return s / (mask.sum() + 1e-8)


def verl_masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, *, exact_bessel: bool = False
) -> torch.Tensor:
    """verl ``verl/utils/torch_functional.py``, ``masked_var`` (verl 0.9.1, tag v0.9.0 483b8a00).

    In order: the masked mean; the masked mean of the squared centred values
    (centred: no ``sum(x^2) - sum(x)^2 / n``); with ``unbiased``, a
    ValueError when the mask sums to 0 or 1, else times ``mask_sum /
    (mask_sum - 1)`` (Bessel over tokens). With an integer mask that factor
    is an integer division, float32, so it is rounded to float32 even when
    the values are float64.

    A departure on request only: ``exact_bessel=True`` takes that factor in
    the values' dtype (``mask_sum.to(values.dtype)``), so that a float64
    variance over an integer mask is float64-exact; the default (False) is
    verl's code.
    """
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        if exact_bessel:
            mask_sum = mask_sum.to(values.dtype)
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def verl_masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, exact_bessel: bool = False
) -> torch.Tensor:
    """verl ``verl/utils/torch_functional.py``, ``masked_whiten`` (verl 0.9.1, tag v0.9.0 483b8a00).

    ``(values - masked_mean) * rsqrt(masked_var + 1e-8)``, the variance
    unbiased over the mask's tokens; with ``shift_mean=False`` the mean is
    added back. Every masked token counts once, so a response's advantage
    weighs in proportion to its length. ``exact_bessel`` is passed to
    ``verl_masked_var`` (a test aid; False is verl's code).
    """
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask, exact_bessel=exact_bessel)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# verl: GDPO --------------------------------------------------------------------------------------


def _verl_grpo_token_advantages(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Hashable],
    epsilon: float,
    norm_adv_by_std_in_grpo: bool,
) -> torch.Tensor:
    """The loop of verl's ``compute_grpo_outcome_advantage`` (verl 0.9.1, tag v0.9.0 483b8a00), on [N] scores.

    A group of one: mean 0, std 1 (its raw score over ``1 + epsilon``);
    otherwise ``torch.mean`` and ``torch.std`` (Bessel); ``(score - mean) /
    (std + epsilon)`` or ``score - mean``; then ``scores.unsqueeze(-1) *
    response_mask``. One change, as ``system_references.verl_grpo_advantages``:
    verl's ``torch.tensor(0.0)`` and ``torch.tensor(1.0)`` are float32, so
    with float64 scores a singleton's ``1.0 + epsilon`` is 1.00000095 there;
    here they take the scores' dtype.
    """
    return verl_grpo_scores(scores, index, epsilon, norm_adv_by_std_in_grpo).unsqueeze(-1) * response_mask


def verl_gdpo_advantages(
    index: Sequence[Hashable],
    rewards: Sequence[Sequence[float]],
    response_mask: Union[torch.Tensor, Sequence[Sequence[float]]],
    reward_weights: Optional[Sequence[float]] = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    dtype: torch.dtype = torch.float64,
    *,
    exact_bessel: bool = False,
) -> torch.Tensor:
    """verl ``verl/trainer/ppo/core_algos.py``, ``compute_gdpo_outcome_advantage`` (``adv_estimator=gdpo``).

    verl 0.9.1; byte-identical to verl-project/verl tag v0.9.0
    (483b8a009ba3a97563edee3a19887e4862b8094a) and main 1dda039b9c63. With
    ``algorithm.gdpo_reward_keys`` naming C keys of ``non_tensor_batch`` and
    ``algorithm.gdpo_reward_weights``. In order:

    1. Per key, the scores are made a float32 tensor and written into a zero
       ``[N, T]`` tensor at each response's last token
       (``attention_mask[:, prompt_length:].sum(1) - 1``).
    2. Per key, ``compute_grpo_outcome_advantage`` on that tensor: the token
       sum (the score), GRPO per group (mean, Bessel std, ``+ epsilon``; a
       group of one keeps its raw score), times ``response_mask``.
    3. ``new_advantage = w_0 * A_0 + w_1 * A_1 + ...`` in key order, the
       weights a float32 tensor (ones without ``gdpo_reward_weights``).
    4. ``masked_whiten(new_advantage, response_mask) * response_mask``: the
       token-weighted mean over the batch's masked tokens, their Bessel
       variance (ValueError with fewer than 2 tokens), ``rsqrt(var + 1e-8)``.

    In training, ``ray_trainer.compute_advantage`` calls it with
    ``token_level_rewards``, ``response_mask``, ``config``, ``index``,
    ``non_tensor_batch`` and ``batch`` only: ``epsilon`` is always 1e-6 and
    ``norm_adv_by_std_in_grpo`` always True (``algorithm.norm_adv_by_std_in_grpo``
    is not passed to it). No NaN handling: a NaN score makes its group's
    mean and std NaN, and then the whitening's mean and variance, so every
    advantage of the batch is NaN.

    Interpretations:

    * ``rewards [N, C]`` are the C keys' per-sample scores. Step 1's write at
      the last token followed by step 2's token sum returns the score
      itself, so the transcription starts from the scores; it does not
      round them to float32 (``dtype``, float64 by default; verl's are
      float32) and its weights take ``dtype`` (verl's are float32: 0.1 is
      0.10000000149 there).
    * The singleton constants of step 2 take the scores' dtype (see
      ``_verl_grpo_token_advantages``).
    * ``response_mask`` is used with the dtype given (a nested list becomes
      int64 if its entries are ints): verl's masked statistics depend on it
      (``verl_masked_mean``, ``verl_masked_var``).
    * ``exact_bessel=True`` (not verl's code: a test aid) takes the
      whitening's Bessel factor over tokens in the values' dtype instead of
      float32 (see ``verl_masked_var``); with an int64 mask the result is
      then float64-exact. False (the default) is verl's code.

    Args:
        index: [N] prompt ids (``uid``).
        rewards: [N, C] scores, one column per reward key.
        response_mask: [N, T] response tokens (1) and padding (0).
        reward_weights: [C] ``gdpo_reward_weights``, or None for ones.
        epsilon: GRPO's epsilon (1e-6 in training).
        norm_adv_by_std_in_grpo: GRPO divides by the std (True in training).
        dtype: the scores' and weights' dtype.
        exact_bessel: the whitening's Bessel factor in ``dtype`` (see ``verl_masked_var``).

    Returns:
        [N, T] advantages (zero outside the mask).
    """
    score_matrix = torch.tensor([list(row) for row in rewards], dtype=dtype)
    response_mask = torch.as_tensor(response_mask)
    num_scores = score_matrix.shape[1]
    score_list = [score_matrix[:, c] for c in range(num_scores)]

    if reward_weights is not None:
        weights = torch.tensor(list(reward_weights), dtype=dtype)
    else:
        weights = torch.ones(num_scores, dtype=dtype)

    new_advantage = None
    for i in range(num_scores):
        normalized_score = _verl_grpo_token_advantages(
            score_list[i], response_mask, index, epsilon, norm_adv_by_std_in_grpo
        )
        if new_advantage is None:
            new_advantage = weights[i] * normalized_score
        else:
            new_advantage += weights[i] * normalized_score

    return verl_masked_whiten(new_advantage, response_mask, exact_bessel=exact_bessel) * response_mask


# verl: OPO ---------------------------------------------------------------------------------------


def verl_opo_advantages(
    index: Sequence[Hashable],
    rewards: Sequence[float],
    response_mask: Union[torch.Tensor, Sequence[Sequence[float]]],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """verl ``verl/trainer/ppo/core_algos.py``, ``compute_opo_outcome_advantage`` (``adv_estimator=opo``).

    verl 0.9.1; byte-identical to verl-project/verl tag v0.9.0
    (483b8a009ba3a97563edee3a19887e4862b8094a) and main 1dda039b9c63. In
    order: ``response_length = response_mask.sum(-1)``; per group of two or
    more, the baseline ``(len * score).sum() / len.sum()`` (the mean of the
    group's scores weighted by response length); a group of one gets
    baseline 0 (its raw score); ``score - baseline``; times
    ``response_mask``. No std, no epsilon: a group whose responses are all
    empty has baseline 0 / 0 = NaN, and its advantages stay NaN even on
    masked-out tokens (NaN * 0 is NaN).

    Interpretations: ``rewards [N]`` are the token sums of
    ``token_level_rewards`` (the score); ``response_mask`` keeps the dtype
    given (the lengths are int64 for an int mask, exact either way).

    Args:
        index: [N] prompt ids (``uid``).
        rewards: [N] scores.
        response_mask: [N, T] response tokens (1) and padding (0).
        dtype: the scores' dtype.

    Returns:
        [N, T] advantages.
    """
    response_mask = torch.as_tensor(response_mask)
    response_length = response_mask.sum(dim=-1)
    scores = torch.tensor(list(rewards), dtype=dtype)

    id2score = defaultdict(list)
    id2len = defaultdict(list)
    id2bsl = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
            id2len[index[i]].append(response_length[i])

        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2bsl[idx] = torch.tensor(0.0, dtype=dtype)
            elif len(id2score[idx]) > 1:
                score_tensor = torch.stack(id2score[idx])
                len_tensor = torch.stack(id2len[idx])
                id2bsl[idx] = (len_tensor * score_tensor).sum() / len_tensor.sum()
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            scores[i] = scores[i] - id2bsl[index[i]]
        scores = scores.unsqueeze(-1) * response_mask

    return scores


# verl: vectorised GRPO before and after PR #6348 ----------------------------------------------------


def verl_group_mean_std(scores: torch.Tensor, gidx: torch.Tensor, eps: float = 1e-6, centered: bool = True) -> tuple:
    """verl ``verl/utils/groupwise.py``, ``group_mean_std``, after (``centered``) or before PR #6348.

    ``centered=True``: commit 1cc810c1ad858b70fddbaac401235b8c6b8fa5e6 (the
    fix; = verl 0.9.1). ``centered=False``: its parent
    9874bea010c57d7d97096d42ddea1795916e5fb8, the code since #3635
    (4ff3ce2fedda1e078ae759c97a5596c43ceb053c). In order: the scores are
    cast to float32 (always: this path has no float64); per group,
    ``count`` and ``s1 = sum`` by ``index_add_``; ``mean = s1 /
    max(count, 1)``; the variance numerator, centred ``sum((x - mean)^2)``
    after the fix, ``s2 - s1^2 / max(count, 1)`` with ``s2 = sum(x^2)``
    before it; ``var = numerator / max(count - 1, 1)``; ``std =
    sqrt(max(var, eps))``; groups of one get mean 0 and std 1. In float32
    the uncentred numerator cancels to 0 for rewards 1.0 and 1.00001, so the
    variance floor ``eps`` decides the std.

    Interpretations: ``gidx`` are already 0..G-1 (``as_torch_index``'s job);
    the device argument is left out.

    Returns:
        (mean [G], std [G], count [G]), float32.
    """
    scores = scores.reshape(-1).to(dtype=torch.float32)
    gidx = gidx.reshape(-1).to(dtype=torch.long)
    G = int(torch.max(gidx).item()) + 1 if gidx.numel() > 0 else 0
    if G == 0:
        empty = torch.empty(0, dtype=torch.float32)
        return empty, empty, empty

    ones = torch.ones_like(scores, dtype=torch.float32)
    count = torch.zeros(G, dtype=torch.float32).index_add_(0, gidx, ones)
    s1 = torch.zeros(G, dtype=torch.float32).index_add_(0, gidx, scores)
    if centered:
        mean = s1 / count.clamp_min(1.0)
        centered_scores = scores - mean[gidx]
        var_num = torch.zeros(G, dtype=torch.float32).index_add_(0, gidx, centered_scores * centered_scores)
    else:
        s2 = torch.zeros(G, dtype=torch.float32).index_add_(0, gidx, scores * scores)
        mean = s1 / count.clamp_min(1.0)
        var_num = s2 - (s1 * s1) / count.clamp_min(1.0)
    denom = (count - 1.0).clamp_min(1.0)
    var = var_num / denom
    std = torch.sqrt(torch.clamp(var, min=eps))

    single = count <= 1.0
    if torch.any(single):
        mean = mean.clone()
        std = std.clone()
        mean[single] = 0.0
        std[single] = 1.0
    return mean, std, count


def verl_grpo_vectorized_advantages(
    index: Sequence[Hashable],
    rewards: Sequence[float],
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    before_6348: bool = False,
) -> torch.Tensor:
    """verl ``core_algos.py``, ``compute_grpo_vectorized_outcome_advantage`` (``adv_estimator=grpo_vectorized``).

    ``before_6348=False``: commit 1cc810c1ad858b70fddbaac401235b8c6b8fa5e6
    (= verl 0.9.1): ``group_mean_std(scores, g, eps=0.0)``, centred.
    ``before_6348=True``: its parent 9874bea010c57d7d97096d42ddea1795916e5fb8:
    ``group_mean_std(scores, g, eps=epsilon)``, uncentred, so the std is at
    least ``sqrt(epsilon)`` (1e-3) and then ``epsilon`` is added once more.
    In order: the token sum (here the rewards themselves, one token of mask
    1 per response), group indices, ``verl_group_mean_std``, then
    ``(score - mean) / (std + epsilon)`` or ``score - mean``. The statistics
    are float32 whatever the scores' dtype, and the scores stay float32
    here (verl's are).

    Interpretations: one token per response (the ``unsqueeze(-1) *
    response_mask`` is left out); ids are numbered by first appearance
    (``as_torch_index`` numbers them by sorted value: the numbering changes
    no result).

    Args:
        index: [N] prompt ids.
        rewards: [N] rewards.
        epsilon: added to the std (and, before #6348, the variance floor).
        norm_adv_by_std_in_grpo: divide by the std.
        before_6348: the code before the fix.

    Returns:
        float32 [N] advantages.
    """
    scores = torch.tensor(list(rewards), dtype=torch.float32)
    numbering: Dict[Hashable, int] = {}
    g = torch.tensor([numbering.setdefault(i, len(numbering)) for i in index], dtype=torch.long)
    with torch.no_grad():
        if before_6348:
            mean_g, std_g, _ = verl_group_mean_std(scores, g, eps=epsilon, centered=False)
        else:
            mean_g, std_g, _ = verl_group_mean_std(scores, g, eps=0.0, centered=True)
        if norm_adv_by_std_in_grpo:
            scalars = (scores - mean_g[g]) / (std_g[g] + epsilon)
        else:
            scalars = scores - mean_g[g]
    return scalars
