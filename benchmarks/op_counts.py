"""Counts the aten ops one tracker update dispatches: the eager path's floor, in a number that does not jitter.

A small batch's update is dispatch-bound: its time is a fixed cost per op
(about 3 to 10 us on a CPU, one kernel launch each on a GPU), times the
number of ops. Timings on a shared machine scatter by tens of percent; the
op count of one update does not, so it is the yardstick for cutting ops
from the eager path (R3 5/5). ``OpCounter`` counts, with a
``TorchDispatchMode``, every aten op that reaches the dispatcher below
autograd (composite ops arrive decomposed, views included), by name.

The script builds each tracker of a grid (the presets in use, ids and
hashed keys, one reward and four), feeds it two warm-up batches, then
counts the ops of one more update of the same shape (for hashed keys, of
keys all held by the table, training's steady state, or all new to it),
with ``check_values``
off (the hot path) and on (each value check adds its ops and a host read).
It writes a JSON and a Markdown table, with the ten most frequent ops of
each case in the JSON::

    python benchmarks/op_counts.py --out=benchmarks/results   # op_counts_cpu.{json,md}, a few seconds

Counts are for the CPU's algorithm choices (``ops.py`` picks some by
device and size); ``--device=cuda`` counts CUDA's.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import torch
from absl import app, flags
from torch.utils._python_dispatch import TorchDispatchMode

from rail_interview.stat_tracking import AdvantageTracker, presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import describe_machine, write_report  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS

#: (N, P): a small batch (dispatch-bound) and a medium one.
SIZES = ((256, 64), (4096, 1000))

#: Builds a tracker from (P, device, check_values).
Build = Callable[[int, torch.device, bool], AdvantageTracker]


def _preset(name: str, **options: Any) -> Build:
    """A builder of preset ``name`` with ``options``."""
    return lambda p, device, check: presets.get(name, p, device=device, check_values=check, **options)


#: name -> (its builder, rewards per sample C, keys: "ids", "hashed" (the counted batch's keys are new to the
#: table) or "held" (hashed, the counted batch is the last warm-up batch again: every key in the table, the
#: steady state of training)).
CASES: Dict[str, Tuple[Build, int, str]] = {
    "ddpo (buffer)": (_preset("ddpo"), 1, "ids"),
    "ema": (_preset("ema"), 1, "ids"),
    "batch": (_preset("batch"), 1, "ids"),
    "trl_grpo": (_preset("trl_grpo"), 1, "ids"),
    "verl_grpo": (_preset("verl_grpo"), 1, "ids"),
    "verl_rloo": (_preset("verl_rloo"), 1, "ids"),
    "grpo + buffer": (_preset("grpo", memory="buffer", min_count=4), 1, "ids"),
    "spo": (_preset("spo"), 1, "ids"),
    "ddpo (buffer), hashed keys, all held": (_preset("ddpo", keys="hashed"), 1, "held"),
    "verl_grpo, hashed keys, all held": (_preset("verl_grpo", keys="hashed"), 1, "held"),
    "ddpo (buffer), hashed keys, all new": (_preset("ddpo", keys="hashed"), 1, "hashed"),
    "verl_grpo, hashed keys, all new": (_preset("verl_grpo", keys="hashed"), 1, "hashed"),
    "trl_grpo, 4 rewards, sum_then_normalize": (
        _preset("trl_grpo", reward_weights=[1.0, 0.5, 0.25, 2.0]),
        4,
        "ids",
    ),
    "trl_grpo, 4 rewards, normalize_then_sum": (
        _preset("trl_grpo", reward_weights=[1.0, 0.5, 0.25, 2.0], multi_objective_aggregation="normalize_then_sum"),
        4,
        "ids",
    ),
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name (``aten.add.Tensor`` -> ``add.Tensor``).

    Example:
        >>> with OpCounter() as counter:
        ...     _ = torch.ones(3) + 1
        >>> counter.total, counter.counts.most_common(1)
        (2, [('ones.default', 1)])
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__ if not hasattr(func, "_schema") else _short_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """The ops counted so far."""
        return sum(self.counts.values())


def _short_name(func: Any) -> str:
    """``aten::add.Tensor`` -> ``add.Tensor``."""
    name = func._schema.name.split("::")[-1]  # pylint: disable=protected-access
    overload = func._overloadname  # pylint: disable=protected-access
    return f"{name}.{overload}"


def _batch(num_samples: int, num_prompts: int, num_rewards: int, keys: str, seed: int, device: torch.device):
    """Ids (or keys far from [0, P)), rewards in [0, 1] ([N] or [N, C]), groups of 8 samples per prompt."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randperm(num_prompts, generator=generator)[: max(1, num_samples // 8)]
    ids = prompts.repeat_interleave(8)[:num_samples]
    ids = torch.cat([ids, prompts[: num_samples - len(ids)]]) if len(ids) < num_samples else ids
    if keys in ("hashed", "held"):
        ids = ids * 1_000_003 + 2**40
    shape = (num_samples,) if num_rewards == 1 else (num_samples, num_rewards)
    rewards = torch.randint(0, 2, shape, generator=generator).float()
    return ids.to(device), rewards.to(device)


def count_update(
    build: Build, num_rewards: int, keys: str, num_samples: int, num_prompts: int, device: torch.device, check: bool
) -> collections.Counter:
    """The ops of one steady-state update (after two warm-up updates of the same shape)."""
    tracker = build(num_prompts, device, check)
    for seed in range(2):
        tracker.update(*_batch(num_samples, num_prompts, num_rewards, keys, seed, device))
    ids, rewards = _batch(num_samples, num_prompts, num_rewards, keys, 1 if keys == "held" else 2, device)
    with torch.no_grad(), OpCounter() as counter:
        tracker.update(ids, rewards)
    return counter.counts


def run(device: torch.device) -> List[Dict[str, Any]]:
    """Counts every case at every size, checks off and on; returns one row per case and size."""
    rows = []
    for name, (build, num_rewards, keys) in CASES.items():
        for num_samples, num_prompts in SIZES:
            off = count_update(build, num_rewards, keys, num_samples, num_prompts, device, False)
            on = count_update(build, num_rewards, keys, num_samples, num_prompts, device, True)
            rows.append(
                dict(
                    case=name,
                    N=num_samples,
                    P=num_prompts,
                    ops=sum(off.values()),
                    ops_with_checks=sum(on.values()),
                    top=off.most_common(10),
                )
            )
    return rows


def markdown(rows: List[Dict[str, Any]], command: str, machine: Dict[str, object]) -> str:
    """The table of ``rows``, with the command and the machine."""
    where = f"{machine.get('platform')}, torch {machine.get('torch')}, device {machine.get('device')}"
    lines = [
        "# Aten ops per tracker update",
        "",
        f"{where}. Command: `{command}`. One steady-state update (after two of the same shape); groups of 8.",
        "",
        "| tracker | N | P | ops (checks off) | ops (checks on) |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['case']} | {r['N']:,} | {r['P']:,} | {r['ops']} | {r['ops_with_checks']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    """Counts, prints and writes the table; returns 0."""
    del argv
    device = torch.device(FLAGS.device)
    rows = run(device)
    command = "python benchmarks/op_counts.py" + (f" --device={FLAGS.device}" if FLAGS.device != "cpu" else "")
    command += f" --out={FLAGS.out}" if FLAGS.out else ""
    machine = describe_machine(device, torch.get_num_threads())
    text = markdown(rows, command, machine)
    print(text)
    out = FLAGS.out or tempfile.mkdtemp(prefix="op_counts_")
    write_report(os.path.join(out, f"op_counts_{device.type}"), dict(command=command, machine=machine, rows=rows), text)
    return 0


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that tests can import the module more than once)."""
    flags.DEFINE_string("out", None, "Directory for op_counts_<device>.{json,md} (default: a fresh temporary one).")
    flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "The trackers' device.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
