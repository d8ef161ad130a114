"""Counts the torch calls that read tensor values back to the host.

On an accelerator, each such call makes the host wait for the device (a
host sync): the queue of launched kernels drains, and the host is idle until
the value arrives. On a CPU nothing waits, so a timing cannot show them;
``SyncCounter`` counts the calls instead, on any device, so that a CPU run
says how many syncs the same code would make on a GPU.

What it counts (one per call, by the name of the torch function):

* values copied out: ``Tensor.item``, ``tolist``, ``numpy``, ``__array__``,
  ``__bool__`` (``if t:``, ``and``, ``assert t``), ``__int__``,
  ``__float__``, ``__complex__``, ``__index__`` (``range(t)``,
  ``list[t]``), ``__format__``, ``__repr__``, ``__str__``, ``__contains__``;
  ``torch.equal``, ``allclose`` and ``is_nonzero``, which return Python bools;
* ops whose output shape depends on the values: ``nonzero``, ``argwhere``,
  ``masked_select``, ``unique``, ``unique_consecutive``, ``bincount``
  (counted with or without ``minlength``: on CUDA it reads the maximum to
  size its output either way), ``repeat_interleave`` with tensor repeats
  and no ``output_size``, one-argument ``where``, ``one_hot`` without
  ``num_classes``;
* ``__getitem__`` and ``__setitem__`` with a boolean mask index (alone or in
  a tuple): the mask becomes indices through ``nonzero``;
* ``Tensor.cpu``, ``Tensor.to`` and ``copy_`` that move a tensor from a
  non-CPU device to the CPU.

Limits: it sees only what passes through ``__torch_function__``, from
Python. Syncs inside a C++ op, a custom extension, a ``torch.compile`` graph
or a CUDA-graph replay, ``torch.cuda.synchronize``, event and stream waits,
and code run under ``torch._C.DisableTorchFunction`` are not counted. A call
made inside a counted call (``torch.unique`` calling ``torch._unique2``) is
not counted again. The list is a model of what syncs on CUDA; a few entries
can take a sync-free path in some cases (``t[mask] = scalar``, a CUDA copy to
pinned memory with ``non_blocking=True``), so it is an upper bound there.
Not thread-safe: count one thread at a time.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

#: Torch functions and Tensor methods that always read values back, by name.
READ_BACK_NAMES = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "__array__",
        "__bool__",
        "__int__",
        "__float__",
        "__complex__",
        "__index__",
        "__format__",
        "__repr__",
        "__str__",
        "__contains__",
        "equal",
        "allclose",
        "is_nonzero",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
    }
)


def _has_bool_mask(index: Any) -> bool:
    """Whether an indexing key is, or holds, a boolean tensor."""
    keys = index if isinstance(index, tuple) else (index,)
    return any(isinstance(key, torch.Tensor) and key.dtype == torch.bool for key in keys)


def _off_cpu(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu"


def _reads_back(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether a call of the torch function ``name`` on these arguments reads values to the host."""
    if name in READ_BACK_NAMES:
        return True
    if name in ("__getitem__", "__setitem__"):
        return len(args) > 1 and _has_bool_mask(args[1])
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name == "one_hot":
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    if name == "cpu":
        return _off_cpu(args[0])
    if name == "to":
        if not _off_cpu(args[0]):
            return False
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]  # pylint: disable=protected-access
        return device is not None and device.type == "cpu"
    if name == "copy_":
        return len(args) > 1 and not _off_cpu(args[0]) and _off_cpu(args[1])
    return False


class SyncCounter(TorchFunctionMode):
    """A torch function mode that counts calls reading tensor values to the host.

    See the module docstring for what is counted and what is missed.

    Attributes:
        count: calls counted so far.
        calls: how many of each, by torch function name.

    Example:
        >>> with SyncCounter() as counter:
        ...     x = torch.arange(4.0)
        ...     total = (x * 2).sum().item()
        ...     values = x.tolist()
        >>> counter.count, dict(counter.calls)
        (2, {'item': 1, 'tolist': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Tuple[type, ...],
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _reads_back(name, args, kwargs):
            self.count += 1
            self.calls[name] += 1
        return func(*args, **kwargs)


def count_syncs(fn: Callable[[], Any]) -> int:
    """Calls ``fn`` once and returns how many host reads ``SyncCounter`` saw.

    Args:
        fn: the call to count.

    Returns:
        The count.
    """
    with SyncCounter() as counter:
        fn()
    return counter.count
