"""Sharing one tracker's statistics across ``torch.distributed`` ranks: the gather of a batch.

With a process group, every rank passes its local batch to ``update``; the
tracker gathers the batches in rank order, updates identical state on
every rank from the whole batch, and returns the local samples' part.
Imports of ``torch.distributed`` happen at call time, so that this package
works on torch builds without distributed support.

Dimensions: N samples in one rank's batch, W ranks.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

#: Validates and converts one rank's batch: (prompt_ids, rewards, valid) in and out.
Validate = Callable[..., Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    """Gathers equal-sized tensors from every rank into ``output``, in rank order.

    ``all_gather_single`` replaced the deprecated ``all_gather_into_tensor``
    in recent torch, with the same arguments; older torch, which setup.py
    allows, has only the latter.

    Args:
        output: [W * N, ...], written in place.
        tensor: [N, ...], this rank's part.
        group: the process group, or None for the default one.
    """
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # pragma: no mutate (torch)
    gather(output, tensor, group=group)


def _agree(
    error: Optional[Exception], prompt_ids, valid, group, device: torch.device, discount=None, weights=None
) -> None:
    """Shares every rank's verdict on its input, and raises on every rank if one was refused.

    One small collective (and host sync): every rank's batch size (-1 for a
    rank whose input was refused), whether it passed a valid mask and
    whether it passed a discount.

    Args:
        error: this rank's refusal of its input, or None.
        prompt_ids: [N], this rank's ids (unchecked when ``error`` is set).
        valid: this rank's valid mask, or None.
        group: the process group.
        device: where the collective's tensors live.
        discount: this rank's per-sample discount, or None.
        weights: this rank's sample weights, or None.

    Raises:
        TypeError, ValueError: this rank's own error, or a ValueError when
            another rank refused its input, the sizes differ or some ranks
            passed a mask (or a discount) and others did not.
    """
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel

    world_size = dist.get_world_size(group)
    size = -1 if error is not None else len(prompt_ids)  # pragma: no mutate (sentinel)
    verdict = torch.tensor([size, valid is not None, discount is not None, weights is not None], device=device)
    verdicts = torch.empty(4 * world_size, dtype=verdict.dtype, device=device)
    all_gather_single(verdicts, verdict, group=group)
    sizes, masks = verdicts[0::4].tolist(), verdicts[1::4].tolist()
    discounts, weighted = verdicts[2::4].tolist(), verdicts[3::4].tolist()
    if error is not None:
        raise error
    refused = [rank for rank, size in enumerate(sizes) if size < 0]
    if refused:
        raise ValueError(f"rank(s) {refused} refused their input to update; see the error there")
    if len(set(sizes)) > 1:
        raise ValueError(f"local batches must have the same size on every rank, got sizes {sizes}")
    for name, given in (("valid", masks), ("discount", discounts), ("weights", weighted)):
        if len(set(given)) > 1:
            raise ValueError(
                f"{name} must be passed on every rank or on none; ranks that passed it: "
                f"{[rank for rank, flag in enumerate(given) if flag]}"
            )


def gather_batch(
    validate: Validate,
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    valid: Optional[torch.Tensor],
    *,
    group,
    device: torch.device,
    check_values: bool,
    discount: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], slice]:
    """Validates this rank's batch and gathers every rank's, in rank order.

    With ``check_values`` the ranks first agree on validity and batch sizes,
    so that bad input on one rank raises on every rank instead of leaving
    the others waiting in a collective. Without it there is no such
    agreement (it would cost a host sync): a rank whose input is refused
    raises alone and the others wait in the all-gather until the process
    group's timeout.

    Args:
        validate: checks and converts one batch, raising TypeError or ValueError.
        prompt_ids: integer [N], this rank's batch.
        rewards: [N], or [N, C] with several rewards.
        valid: bool [N], or None.
        group: the process group.
        device: the tracker's device.
        check_values: whether the ranks agree on their inputs first.
        discount: float [N], a per-sample value gathered as the rewards are
            (``validate`` checks it), or None; passed on every rank or none.
        dtype: what ``discount`` and ``weights`` are converted to before the
            gather, so that ranks that passed different dtypes agree.
        weights: float [N], sample weights gathered likewise, or None;
            passed on every rank or none.

    Returns:
        int64 [W * N] ids, [W * N] (or [W * N, C]) rewards, bool [W * N]
        valid (or None), [W * N] discounts (or None), [W * N] weights (or
        None), and the slice of the gathered batch that is this rank's.

    Raises:
        TypeError, ValueError: as ``validate``, or as ``_agree``.
    """
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel

    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    error: Optional[Exception] = None
    try:
        prompt_ids, rewards, valid = validate(prompt_ids, rewards, valid)
    except (TypeError, ValueError) as caught:
        if not check_values:
            raise
        error = caught
    if check_values:
        _agree(error, prompt_ids, valid, group, device, discount, weights)
    num_local = len(prompt_ids)
    if dtype is not None:
        discount = None if discount is None else discount.to(dtype)
        weights = None if weights is None else weights.to(dtype)

    def gather(local: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Every rank's ``local``, in rank order (None where not passed)."""
        if local is None:
            return None
        whole = torch.empty(world_size * num_local, *local.shape[1:], dtype=local.dtype, device=device)
        all_gather_single(whole, local.contiguous(), group=group)
        return whole

    mine = slice(rank * num_local, (rank + 1) * num_local)
    return gather(prompt_ids), gather(rewards), gather(valid), gather(discount), gather(weights), mine
