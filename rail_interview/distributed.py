"""The little of torch.distributed that training needs: who am I, and gather.

``scripts/train.py`` starts a process group when launched by ``torchrun``
(``WORLD_SIZE`` > 1); ``current_context`` then describes it, and otherwise a
single process. Every rank runs the same training loop on its own samples;
``all_gather`` concatenates tensors in rank order so that every rank can
apply the global batch's update.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from rail_interview.stat_tracking.distributed import all_gather_single


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job.

    Attributes:
        rank: this process's rank, 0 for a single process.
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        group: the process group, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs and checkpoints."""
        return self.rank == 0

    def all_gather(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Concatenates each tensor over ranks, in rank order.

        Args:
            *tensors: [N, ...] tensors, the same shapes on every rank.

        Returns:
            [world_size * N, ...] tensors (the inputs themselves for one process).
        """
        if self.group is None:
            return tensors
        gathered = []
        for tensor in tensors:
            out = torch.empty(
                (self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
            )
            all_gather_single(out, tensor.contiguous(), group=self.group)
            gathered.append(out)
        return tuple(gathered)

    def gather_objects(self, value: Any) -> List[Any]:
        """Returns every rank's ``value``, in rank order (a host sync).

        Args:
            value: any picklable object.

        Returns:
            world_size values.
        """
        if self.group is None:
            return [value]
        values: List[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast_object(self, value: Any) -> Any:
        """Returns rank 0's ``value`` on every rank.

        Args:
            value: any picklable object (ignored off rank 0).

        Returns:
            Rank 0's value.
        """
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def current_context() -> DistributedContext:
    """Describes the default process group if one is initialized, else a single process.

    Returns:
        The context.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        group=dist.group.WORLD,
    )


def shutdown() -> None:
    """Destroys the default process group, if any, before the process exits."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_from_environment(device_name: str) -> DistributedContext:
    """Starts the default process group when launched by torchrun.

    Args:
        device_name: the config's device, "auto", "cpu" or "cuda": NCCL for
            CUDA, gloo for the CPU.

    Returns:
        The context; a single process when ``WORLD_SIZE`` is unset or 1.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current_context()
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return current_context()
