"""Times several rewards per sample: one tracker of C = 4 rewards against single-reward trackers combined by hand.

Usage:
    python benchmarks/bench_multi_reward.py                    # CPU, one thread, the full grid, into a temporary dir
    python benchmarks/bench_multi_reward.py --out=benchmarks/results   # the same, into the committed results
    python benchmarks/bench_multi_reward.py --compile          # torch.compile(fullgraph=True) of the one tracker too
    python benchmarks/bench_multi_reward.py --quick            # tiny sizes and short timings: a smoke test, not figures
    python benchmarks/bench_multi_reward.py --device=cuda      # on CUDA, timed with CUDA events
    python benchmarks/bench_multi_reward.py --ab_rev=REV       # the single-reward update, REV against the working tree

Every tracker is TRL's GRPO (``presets.trl_grpo``: group mean, sample std
+ 1e-4, fallback 0 below two rewards; ``normalize_then_sum`` whitens the
sums over the batch, sample std + 1e-4) over a memory: ``none`` (GRPO),
``buffer`` (the last 16 rewards) or ``ema`` (decay 0.9). A batch is N / 8
distinct prompts of P, 8 samples each, interleaved, with C = 4 rewards per
sample on different scales: a pass from the prompt's fixed pass rate, a
format check passed 90% of the time, a uniform score in [0, 1) and a normal
one of std 5 around 10; the weights are ``REWARD_WEIGHTS``. For every case
(N, P, memory, aggregation order) it times one update of:

* ``one``: one tracker with ``num_rewards=4`` fed the rewards [N, 4];
* ``by hand``: with ``normalize_then_sum``, four separate single-reward
  trackers, each fed its own contiguous [N] rewards (as four reward
  functions hand them over), their advantages weighted and summed, then
  whitened over the batch, by hand; with ``sum_then_normalize``, where four
  trackers would compute something else, the weighted sum of the rewards by
  hand and one single-reward tracker;
* ``loop``: the same as a Python loop over the channels of the [N, 4]
  tensor: ``acc += w_c * trackers[c].update(ids, rewards[:, c])``
  (``normalize_then_sum``) or ``acc += w_c * rewards[:, c]`` before the one
  single-reward tracker (``sum_then_normalize``);
* ``one compiled`` (with --compile): ``torch.compile(fullgraph=True,
  dynamic=False)`` of ``one``'s update on a tracker with ``check_values=False``.

All take the default input checks (``check_values=True``, once per
single-reward tracker) unless --nocheck_values.

Before timing, every case feeds the same ``--steps`` batches to all of them
(prompts come back across steps) and raises unless, at every step, each
one's advantages match ``one``'s, and after the last step the memory's state
does (the single-reward trackers' stacked on the reward axis for
``normalize_then_sum``), to ``TOLERANCE``; the largest differences go into
the JSON. Those steps also warm them up. Then each is timed on one fixed
batch in ``--rounds`` rounds that take turns over all of them, each round a
median over many runs (CPU: torch.utils.benchmark's wall time, or with
``--clock=cpu`` the thread's CPU time, steadier on a busy machine; CUDA:
CUDA events); the median over rounds is reported. Prints a Markdown table (milliseconds per
update and the by-hand and loop times over the one tracker's) and writes
it, and JSON with the machine, torch version, thread count, command and
every round, to --out: a fresh temporary directory unless --out names one,
printed at the end.

With ``--ab_rev=REV``, instead: the single-reward update (C = 1, the
trackers ``by hand`` uses, memories none, buffer and ema) of the package as
it is at REV against the working tree's, both imported in this process as
benchmarks/ab_trackers.py does, on ab_trackers.py's cases (its headline
sizes) with single rewards (the weighted sum of the C = 4 above). It first
checks that both return bit-identical advantages and state over
``--steps`` batches, then times them in ``--rounds`` rounds, alternating
which goes first, and reports the medians and new / old (below 1: the
working tree is faster) with the smallest and largest per-round ratio, in
``ab_single_reward_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from absl import app, flags

from rail_interview import stat_tracking
from rail_interview.stat_tracking import presets
from rail_interview.stat_tracking.tracker import AGGREGATIONS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from revisions import PACKAGE, REPO_ROOT, import_revision  # noqa: E402  pylint: disable=wrong-import-position
from timing import describe_machine, time_cpu, time_cuda, time_thread  # noqa: E402  pylint: disable=wrong-import-position

#: (N, P) cases: N / GROUP_SIZE distinct prompts of P per batch, GROUP_SIZE samples each.
GRIDS: Dict[str, List[Tuple[int, int]]] = {
    "full": [(256, 64), (4096, 1_000), (32768, 100_000)],
    "quick": [(32, 8), (96, 40)],
}
#: The A/B's cases: benchmarks/ab_trackers.py's (bench_trackers.py's headline sizes).
AB_GRIDS: Dict[str, List[Tuple[int, int]]] = {
    "headline": [(256, 64), (4096, 1_000), (4096, 1_000_000), (32768, 4096)],
    "quick": [(32, 8), (96, 40)],
}
MEMORIES = ("none", "buffer", "ema")
#: Each memory's own option.
MEMORY_OPTIONS: Dict[str, Dict[str, object]] = {"none": {}, "buffer": {"buffer_size": 16}, "ema": {"decay": 0.9}}
#: C = 4 reward functions' weights (exact in float32).
REWARD_WEIGHTS = (1.0, 0.5, 0.25, 2.0)
GROUP_SIZE = 8
#: TRL's whitening after normalize_then_sum: sample std + 1e-4.
WHITEN_DDOF, WHITEN_EPS = 1, 1e-4

#: Largest difference from the one tracker that counts as agreement (float32; relative and absolute).
TOLERANCE = 1e-5

FLAGS = flags.FLAGS

#: (ids [N], rewards [N, C], the same rewards as C contiguous [N] columns) -> advantages [N].
Step = Callable[[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]


def multi_reward_batch(num_samples: int, num_prompts: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of N / GROUP_SIZE distinct prompts, GROUP_SIZE samples each, interleaved, with 4 rewards per sample.

    Each prompt passes with a fixed rate (the same for every seed), so that
    its memory tracks something.

    Args:
        num_samples: N, a multiple of GROUP_SIZE, N / GROUP_SIZE at most P.
        num_prompts: P.
        seed: draws the prompts, their order and the rewards.

    Returns:
        int64 [N] ids in [0, P) and float32 [N, 4] rewards: a pass in {0, 1},
        a format check in {0, 1}, a uniform score in [0, 1) and a normal
        score of mean 10 and std 5, on the CPU.
    """
    pass_rate = torch.rand(num_prompts, generator=torch.Generator().manual_seed(12345))  # [P]
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randperm(num_prompts, generator=generator)[: num_samples // GROUP_SIZE]  # [N / G]
    ids = prompts.repeat_interleave(GROUP_SIZE)[torch.randperm(num_samples, generator=generator)]  # [N]
    passed = (torch.rand(num_samples, generator=generator) < pass_rate[ids]).float()
    formatted = (torch.rand(num_samples, generator=generator) < 0.9).float()
    uniform = torch.rand(num_samples, generator=generator)
    normal = torch.randn(num_samples, generator=generator) * 5 + 10
    return ids, torch.stack([passed, formatted, uniform, normal], 1)  # [N], [N, 4]


def whiten(advantages: torch.Tensor) -> torch.Tensor:
    """TRL's last step of ``normalize_then_sum``, by hand: ``(a - mean) / (std + 1e-4)``, sample std.

    Args:
        advantages: float [N], every sample valid.

    Returns:
        float [N].
    """
    return (advantages - advantages.mean()) / (advantages.std(correction=WHITEN_DDOF) + WHITEN_EPS)


def single_reward_tracker(module, num_prompts: int, memory: str, device: torch.device, check_values: bool):
    """One reward function's tracker: ``presets.trl_grpo`` over ``memory``, no whitening.

    Args:
        module: a ``stat_tracking`` module (this package's, or a revision's for the A/B).
        num_prompts: P.
        memory: one of ``MEMORIES``.
        device: its device.
        check_values: its ``check_values``.

    Returns:
        The tracker; ``update`` takes rewards [N].
    """
    options = MEMORY_OPTIONS[memory]
    return module.presets.trl_grpo(num_prompts, memory=memory, device=device, check_values=check_values, **options)


def multi_reward_tracker(num_prompts: int, memory: str, order: str, device: torch.device, check_values: bool):
    """The tracker of C = 4 rewards: ``presets.trl_grpo`` with ``REWARD_WEIGHTS`` over ``memory``.

    Args:
        num_prompts: P.
        memory: one of ``MEMORIES``.
        order: one of ``AGGREGATIONS``.
        device: its device.
        check_values: its ``check_values``.

    Returns:
        The tracker; ``update`` takes rewards [N, 4].
    """
    return presets.trl_grpo(
        num_prompts,
        multi_objective_aggregation=order,
        reward_weights=REWARD_WEIGHTS,
        memory=memory,
        device=device,
        check_values=check_values,
        **MEMORY_OPTIONS[memory],
    )


def build_variants(
    num_prompts: int, memory: str, order: str, device: torch.device, *, check_values: bool, compile_update: bool
) -> Dict[str, Tuple[List[object], Step]]:
    """What is timed, by result name: (its trackers, its step).

    Args:
        num_prompts: P.
        memory: one of ``MEMORIES``.
        order: one of ``AGGREGATIONS``.
        device: the trackers' device.
        check_values: the trackers' ``check_values``.
        compile_update: add ``one_compiled``.

    Returns:
        ``one``, ``by_hand``, ``loop`` and, if asked, ``one_compiled``; the
        first tracker of each is the one whose state is compared (``by_hand``
        and ``loop`` with ``normalize_then_sum``: all four, stacked).
    """
    weights = torch.tensor(REWARD_WEIGHTS, device=device)  # [C]
    num_rewards = len(REWARD_WEIGHTS)
    variants: Dict[str, Tuple[List[object], Step]] = {}
    one = multi_reward_tracker(num_prompts, memory, order, device, check_values)
    variants["one"] = [one], lambda ids, rewards, columns: one.update(ids, rewards)

    def single() -> object:
        """A fresh single-reward tracker of the case's memory, on its device."""
        return single_reward_tracker(stat_tracking, num_prompts, memory, device, check_values)

    if order == "normalize_then_sum":
        hand = [single() for _ in range(num_rewards)]

        def by_hand(ids: torch.Tensor, rewards: torch.Tensor, columns: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            """Four trackers on four contiguous columns, then the weighted sum and whitening by hand."""
            advantages = torch.stack([t.update(ids, column) for t, column in zip(hand, columns)], 1)  # [N, C]
            return whiten((advantages * weights).sum(1))

        looped = [single() for _ in range(num_rewards)]

        def loop(ids: torch.Tensor, rewards: torch.Tensor, columns: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            """A Python loop over the channels of the [N, C] rewards, then whitening by hand."""
            total = torch.zeros(len(ids), device=device)
            for c, tracker in enumerate(looped):
                total += REWARD_WEIGHTS[c] * tracker.update(ids, rewards[:, c])
            return whiten(total)

    else:
        hand, looped = [single()], [single()]

        def by_hand(ids: torch.Tensor, rewards: torch.Tensor, columns: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            """The weighted sum of the rewards by hand, then one single-reward tracker."""
            return hand[0].update(ids, (rewards * weights).sum(1))

        def loop(ids: torch.Tensor, rewards: torch.Tensor, columns: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            """The weighted sum as a Python loop over the channels, then one single-reward tracker."""
            total = torch.zeros(len(ids), device=device)
            for c in range(num_rewards):
                total += REWARD_WEIGHTS[c] * rewards[:, c]
            return looped[0].update(ids, total)

    variants["by_hand"] = hand, by_hand
    variants["loop"] = looped, loop
    if compile_update:
        # Each case compiles a new tracker's update from the same code: forget the last case's
        # compilations, which would otherwise count towards dynamo's recompile limit.
        torch._dynamo.reset()  # pylint: disable=protected-access
        compiled = multi_reward_tracker(num_prompts, memory, order, device, check_values=False)
        step = torch.compile(lambda ids, rewards: compiled.update(ids, rewards), fullgraph=True, dynamic=False)
        variants["one_compiled"] = [compiled], lambda ids, rewards, columns: step(ids, rewards)
    return variants


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference of two tensors, in float64 on the CPU; 0 when they are empty."""
    if got.numel() == 0:
        return 0.0
    return (got.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()


def reward_columns(rewards: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The C columns of rewards [N, C], each contiguous [N], as C reward functions hand them over."""
    return tuple(rewards[:, c].contiguous() for c in range(rewards.shape[1]))


def check_agreement(
    variants: Dict[str, Tuple[List[object], Step]],
    num_samples: int,
    num_prompts: int,
    steps: int,
    device: torch.device,
    case: str,
) -> Dict[str, Dict[str, float]]:
    """Feeds the same batches to every variant and raises unless each agrees with ``one``.

    Args:
        variants: fresh, as ``build_variants`` returns them.
        num_samples: N.
        num_prompts: P.
        steps: batches to feed.
        device: the trackers' device.
        case: names the case in an error.

    Returns:
        Per variant other than ``one``, the largest absolute difference from
        ``one`` of its advantages over all steps (``advantages``) and of the
        memory's state after the last step (``state``: the single-reward
        trackers' stacked on the reward axis, [P, C, ...], for
        ``normalize_then_sum``; 0 without a memory).

    Raises:
        AssertionError: if a variant's advantages or state differ by more than ``TOLERANCE``.
    """
    others = [name for name in variants if name != "one"]
    diffs = {name: {"advantages": 0.0, "state": 0.0} for name in others}
    for seed in range(steps):
        ids, rewards = multi_reward_batch(num_samples, num_prompts, seed)
        ids, rewards = ids.to(device), rewards.to(device)
        columns = reward_columns(rewards)
        expected = variants["one"][1](ids, rewards, columns).cpu()
        for name in others:
            got = variants[name][1](ids, rewards, columns).cpu()
            torch.testing.assert_close(
                got,
                expected,
                rtol=TOLERANCE,
                atol=TOLERANCE,
                msg=lambda m, n=name, s=seed: f"{case}, {n}, step {s}: {m}",
            )
            diffs[name]["advantages"] = max(diffs[name]["advantages"], _max_diff(got, expected))
    expected_state = variants["one"][0][0].state_dict()
    for name in others:
        states = [tracker.state_dict() for tracker in variants[name][0]]
        for key, value in expected_state.items():
            got = states[0][key] if len(states) == 1 else torch.stack([state[key] for state in states], 1)
            torch.testing.assert_close(
                got.cpu(),
                value.cpu(),
                rtol=TOLERANCE,
                atol=TOLERANCE,
                msg=lambda m, n=name, k=key: f"{case}, {n}, {k}: {m}",
            )
            diffs[name]["state"] = max(diffs[name]["state"], _max_diff(got, value))
    return diffs


def _timer(
    device: torch.device, threads: int, min_run_time: float, clock: str
) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: CUDA events on CUDA; on the CPU, as ``clock`` (``--clock``) says, with ``threads`` threads."""
    if device.type == "cuda":
        return lambda fn: time_cuda(fn, min_run_time)
    if clock == "cpu":
        if threads != 1:
            raise app.UsageError("--clock=cpu measures one thread: it needs --threads=1")
        return lambda fn: time_thread(fn, min_run_time)
    return lambda fn: time_cpu(fn, threads, min_run_time)


def run_case(
    num_samples: int,
    num_prompts: int,
    memory: str,
    order: str,
    device: torch.device,
    *,
    threads: int,
    min_run_time: float,
    rounds: int,
    steps: int,
    clock: str,
    check_values: bool,
    compile_update: bool,
) -> Dict[str, object]:
    """Checks agreement, then times every variant on one case.

    Args:
        num_samples: N.
        num_prompts: P.
        memory: one of ``MEMORIES``.
        order: one of ``AGGREGATIONS``.
        device: the trackers' device.
        threads: torch threads while timing on the CPU.
        min_run_time: seconds of timed runs per variant and round, at least.
        rounds: rounds of timing over all variants.
        steps: batches of the agreement check (which also warm the trackers up).
        clock: on the CPU, ``"wall"`` (torch.utils.benchmark) or ``"cpu"`` (the thread's CPU time).
        check_values: the trackers' ``check_values``.
        compile_update: time ``one_compiled`` too.

    Returns:
        N, P, memory, order, the largest differences of the check
        (``max_diff``), the median over rounds of each variant's milliseconds
        per update (``one_ms``, ``by_hand_ms``, ...) and every round's figure
        (``rounds``).
    """
    variants = build_variants(
        num_prompts, memory, order, device, check_values=check_values, compile_update=compile_update
    )
    case = f"N={num_samples} P={num_prompts} {memory} {order}"
    diffs = check_agreement(variants, num_samples, num_prompts, steps, device, case)

    ids, rewards = multi_reward_batch(num_samples, num_prompts, seed=steps)
    ids, rewards = ids.to(device), rewards.to(device)
    columns = reward_columns(rewards)
    time_call = _timer(device, threads, min_run_time, clock)
    # Rounds over all variants in turn, so that a slow spell of the machine
    # hits every variant alike; the median over rounds is reported.
    times: Dict[str, List[float]] = {f"{name}_ms": [] for name in variants}
    for _ in range(rounds):
        for name, (_, step) in variants.items():
            times[f"{name}_ms"].append(1e3 * time_call(lambda step=step: step(ids, rewards, columns)))
    result: Dict[str, object] = {"N": num_samples, "P": num_prompts, "memory": memory, "order": order}
    result["max_diff"] = diffs
    for name, values in times.items():
        result[name] = statistics.median(values)
    result["rounds"] = times
    return result


def format_table(rows: List[Dict[str, object]]) -> str:
    """Formats results as a Markdown table: milliseconds per update and each variant's time over the one tracker's.

    Args:
        rows: as returned by ``run_case``.

    Returns:
        The table.
    """
    compiled = "one_compiled_ms" in rows[0]
    header = ["N", "P", "memory", "order", "one ms", "by hand ms", "loop ms"]
    header += ["one compiled ms"] if compiled else []
    header += ["by hand / one", "loop / one"] + (["one / compiled"] if compiled else [])
    header += ["max abs diff (advantages, state)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * 2 + " :--- |" * 2]
    lines[-1] += " ---: |" * (len(header) - 5) + " :--- |"
    for row in rows:
        cells = [f"{row['N']:,}", f"{row['P']:,}", str(row["memory"]), str(row["order"])]
        names = ["one", "by_hand", "loop"] + (["one_compiled"] if compiled else [])
        cells += [_ms(row[f"{name}_ms"]) for name in names]
        cells += [f"{row[f'{name}_ms'] / row['one_ms']:.2f}x" for name in ("by_hand", "loop")]
        cells += [f"{row['one_ms'] / row['one_compiled_ms']:.2f}x"] if compiled else []
        diffs = row["max_diff"]
        cells.append(
            f"{max(d['advantages'] for d in diffs.values()):.1e}, {max(d['state'] for d in diffs.values()):.1e}"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds to three decimals, or one from 10 ms on."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# The A/B of the single-reward update.


def single_reward_batch(num_samples: int, num_prompts: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``multi_reward_batch``'s ids and the weighted sum of its rewards: int64 [N], float32 [N]."""
    ids, rewards = multi_reward_batch(num_samples, num_prompts, seed)
    return ids, (rewards * torch.tensor(REWARD_WEIGHTS)).sum(1)


def run_ab_case(
    old_module,
    num_samples: int,
    num_prompts: int,
    memory: str,
    device: torch.device,
    *,
    threads: int,
    min_run_time: float,
    rounds: int,
    steps: int,
    clock: str,
    check_values: bool,
) -> Dict[str, object]:
    """Checks that a revision's single-reward tracker and the working tree's agree bit for bit, then times both.

    Args:
        old_module: the revision's ``stat_tracking``.
        num_samples: N.
        num_prompts: P.
        memory: one of ``MEMORIES``.
        device: the trackers' device.
        threads: torch threads while timing on the CPU.
        min_run_time: seconds of timed runs per version and round, at least.
        rounds: rounds of timing; odd rounds time the working tree first.
        steps: batches of the check.
        clock: on the CPU, ``"wall"`` or ``"cpu"``, as for ``run_case``.
        check_values: the trackers' ``check_values``.

    Returns:
        N, P, memory, the medians over rounds (``old_ms``, ``new_ms``), their
        ratio ``new_over_old``, the smallest and largest per-round ratio and
        every round's figures.

    Raises:
        AssertionError: if an advantage or a state tensor is not bit-identical.
    """
    trackers = {
        "old": single_reward_tracker(old_module, num_prompts, memory, device, check_values),
        "new": single_reward_tracker(stat_tracking, num_prompts, memory, device, check_values),
    }
    for seed in range(steps):
        ids, rewards = single_reward_batch(num_samples, num_prompts, seed)
        ids, rewards = ids.to(device), rewards.to(device)
        old, new = (tracker.update(ids, rewards) for tracker in trackers.values())
        assert torch.equal(old, new), f"N={num_samples} P={num_prompts} {memory}, step {seed}: advantages differ"
    old_state, new_state = (tracker.state_dict() for tracker in trackers.values())
    assert old_state.keys() == new_state.keys(), f"{memory}: state keys differ"
    for key, value in old_state.items():
        assert torch.equal(value, new_state[key]), f"N={num_samples} P={num_prompts} {memory}: state {key} differs"

    ids, rewards = single_reward_batch(num_samples, num_prompts, seed=steps)
    ids, rewards = ids.to(device), rewards.to(device)
    time_call = _timer(device, threads, min_run_time, clock)
    times: Dict[str, List[float]] = {"old_ms": [], "new_ms": []}
    for round_ in range(rounds):
        order = ["old", "new"] if round_ % 2 == 0 else ["new", "old"]
        for name in order:
            update = trackers[name].update
            times[f"{name}_ms"].append(1e3 * time_call(lambda update=update: update(ids, rewards)))
    ratios = [new / old for old, new in zip(times["old_ms"], times["new_ms"])]
    result: Dict[str, object] = {"N": num_samples, "P": num_prompts, "memory": memory}
    result.update({name: statistics.median(values) for name, values in times.items()})
    result["new_over_old"] = result["new_ms"] / result["old_ms"]
    result["round_ratio_min"], result["round_ratio_max"] = min(ratios), max(ratios)
    result["rounds"] = times
    return result


def format_ab_table(rows: List[Dict[str, object]]) -> str:
    """Formats A/B results as a Markdown table.

    Args:
        rows: as returned by ``run_ab_case``.

    Returns:
        The table.
    """
    header = ["memory", "N", "P", "old ms", "new ms", "new / old", "per-round new / old (min, max)"]
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        cells = [str(row["memory"]), f"{row['N']:,}", f"{row['P']:,}", _ms(row["old_ms"]), _ms(row["new_ms"])]
        cells += [f"{row['new_over_old']:.3f}", f"{row['round_ratio_min']:.3f}, {row['round_ratio_max']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    """Runs git with ``args`` in the repository and returns its output, stripped."""
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _write(
    out: Optional[str], stem: str, title: str, summary: str, table: str, report: Dict[str, object], notes: Sequence[str]
) -> None:
    """Writes ``<out>/<stem>.json`` (``report``) and ``<out>/<stem>.md`` (the title, summary, notes and table)."""
    if out == "":
        return
    out = tempfile.mkdtemp(prefix="rail_interview_bench_multi_reward_") if out is None else out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem)
    with open(f"{path}.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(f"{path}.md", "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{summary}\nCommand: `{report['command']}`\n")
        f.write("".join(f"{note}\n" for note in notes))
        f.write(f"\n{table}\n")
    print(f"Wrote {path}.json and {path}.md")


def main(argv: List[str]) -> None:
    """Runs the grid (or the A/B), prints the table and writes the JSON and the table to ``--out``.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(FLAGS.threads)
    device = torch.empty(0, device=FLAGS.device).device
    quick = FLAGS.quick
    min_run_time = min(FLAGS.min_run_time, 0.01) if quick else FLAGS.min_run_time
    rounds = min(FLAGS.rounds, 2) if quick else FLAGS.rounds
    machine = describe_machine(device, FLAGS.threads)
    summary = (
        f"{datetime.date.today().isoformat()}, {machine['gpu'] if 'gpu' in machine else machine['processor']}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {FLAGS.threads} thread(s), device {device}; "
        f"median over {rounds} round(s) of {min_run_time:g} s or more per variant"
        + (", CPU time of the thread." if device.type == "cpu" and FLAGS.clock == "cpu" else ".")
    )
    print(summary)
    tag = re.sub(r"[^a-z0-9]+", "-", str(machine.get("gpu", device.type)).lower()).strip("-")
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    # Which package was measured: the benchmarks may run from a clean checkout beside a busy working tree.
    head, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--", PACKAGE)
    library = f"{PACKAGE} of HEAD {head}, {'with uncommitted changes' if dirty else 'as committed'}"
    print(f"{library}: {os.path.dirname(stat_tracking.__file__)}")
    report: Dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "command": command,
        "head": head,
        "library_modified": bool(dirty),
        "min_run_time_s": min_run_time,
        "rounds": rounds,
        "check_values": FLAGS.check_values,
        "clock": "cuda_events" if device.type == "cuda" else FLAGS.clock,
    }
    common = dict(threads=FLAGS.threads, min_run_time=min_run_time, rounds=rounds, steps=FLAGS.steps, clock=FLAGS.clock)
    if FLAGS.ab_rev is not None:
        grid = "quick" if quick else "headline"
        rev = _git("rev-parse", "--short", FLAGS.ab_rev)
        new = f"the working tree ({library})"
        rows = []
        with tempfile.TemporaryDirectory() as directory:
            old_module = import_revision(FLAGS.ab_rev, directory)
            print(f"{FLAGS.ab_rev} ({rev}, old) against {new}")
            for memory in MEMORIES:
                for num_samples, num_prompts in AB_GRIDS[grid]:
                    row = run_ab_case(
                        old_module, num_samples, num_prompts, memory, device, check_values=FLAGS.check_values, **common
                    )
                    rows.append(row)
                    print(
                        f"  {memory:>6} N={num_samples:>6} P={num_prompts:>9}: bit-identical; old {row['old_ms']:.3f} "
                        f"ms, new {row['new_ms']:.3f} ms, new / old {row['new_over_old']:.3f}",
                        flush=True,
                    )
        table = format_ab_table(rows)
        print(table)
        report.update(grid=grid, rev=FLAGS.ab_rev, rev_hash=rev, results=rows)
        notes = [
            f"Old: `{FLAGS.ab_rev}` ({rev}); new: {new}. Single-reward `presets.trl_grpo` over each memory, "
            f"advantages and state checked bit-identical over {FLAGS.steps} batches first."
        ]
        _write(FLAGS.out, f"ab_single_reward_{tag}", "The single-reward update, A/B", summary, table, report, notes)
        return
    grid = "quick" if quick else "full"
    rows = []
    for num_samples, num_prompts in GRIDS[grid]:
        for memory in MEMORIES:
            for order in AGGREGATIONS:
                rows.append(
                    run_case(
                        num_samples,
                        num_prompts,
                        memory,
                        order,
                        device,
                        check_values=FLAGS.check_values,
                        compile_update=FLAGS.compile,
                        **common,
                    )
                )
                print(
                    f"  N={num_samples} P={num_prompts} {memory} {order}: agree; "
                    + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.endswith("_ms")),
                    flush=True,
                )
    table = format_table(rows)
    print(table)
    report.update(grid=grid, reward_weights=REWARD_WEIGHTS, group_size=GROUP_SIZE, tolerance=TOLERANCE, results=rows)
    notes = [
        f"{library}. C = {len(REWARD_WEIGHTS)} rewards, weights {REWARD_WEIGHTS}, groups of {GROUP_SIZE}; "
        "`presets.trl_grpo` "
        f"over each memory; check_values={FLAGS.check_values}. by hand: four single-reward trackers, weighted sum "
        "and whitening by hand (normalize_then_sum), or the weighted sum by hand and one single-reward tracker "
        "(sum_then_normalize); loop: the same as a Python loop over the [N, 4] tensor's channels."
    ]
    _write(
        FLAGS.out,
        f"multi_reward_{tag}_{grid}",
        "Several rewards per sample (C = 4), one update",
        summary,
        table,
        report,
        notes,
    )


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that headline.py can import this module beside others)."""
    flags.DEFINE_bool("quick", False, "Tiny sizes, at most 0.01 s per timing and 2 rounds: a smoke test, not figures.")
    flags.DEFINE_string("device", "cpu", "The trackers' device, cpu or cuda.")
    flags.DEFINE_integer("threads", 1, "CPU threads for torch.")
    flags.DEFINE_float("min_run_time", 0.4, "Seconds of timed runs per variant, case and round, at least.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timing over all variants; the median over rounds is reported.")
    flags.DEFINE_integer("steps", 6, "Batches fed to every variant to check agreement, before timing.")
    flags.DEFINE_bool("compile", False, "Also time torch.compile(fullgraph=True) of the one tracker's update.")
    flags.DEFINE_bool("check_values", True, "The trackers' check_values (the compiled one's is off).")
    flags.DEFINE_enum(
        "clock",
        "wall",
        ["wall", "cpu"],
        "On the CPU, wall: torch.utils.benchmark's wall time (timing.time_cpu); cpu: this thread's CPU time "
        "(user and system) over blocks of calls, which other processes on a busy machine disturb far less.",
    )
    flags.DEFINE_string(
        "ab_rev", None, "Instead of the grid: the single-reward update of this git revision against the working tree's."
    )
    flags.DEFINE_string(
        "out",
        None,
        "Directory for the JSON and Markdown results (default: a fresh temporary directory; "
        "--out=benchmarks/results writes the committed ones); empty to write none.",
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
