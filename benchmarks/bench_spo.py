"""Times SPO's per-prompt tracker: ``presets.spo`` against the dicts of verl's SPO recipe.

Usage:
    python benchmarks/bench_spo.py                          # CPU, one thread, the full grid, into a temporary directory
    python benchmarks/bench_spo.py --out=benchmarks/results # the same, into the committed results
    python benchmarks/bench_spo.py --compile                # torch.compile(fullgraph=True) of the update too
    python benchmarks/bench_spo.py --quick                  # tiny sizes and short timings: a smoke test, not figures
    python benchmarks/bench_spo.py --device=cuda            # the tensor trackers on CUDA, timed with CUDA events

SPO (Single-stream Policy Optimization, verl's ``recipe/spo``) samples one
answer per prompt and takes its baseline from a Beta posterior of the
prompt's pass rate, kept across steps. For every case (N samples of N
distinct prompts drawn without replacement from P, G = 1; binary rewards
from a fixed pass rate per prompt; a random divergence D per sample, a
quarter of them 0 as at a prompt's first visit) it times one update of:

* ``dict``: ``SpoDictTracker`` of benchmarks/baselines.py, the recipe's
  ``prompt2alpha`` / ``prompt2beta`` dicts, float32 tensors built from them
  per step, and a loop of ``.item()`` writes (on the host, where the recipe
  runs it);
* ``spo``: ``presets.spo(P)`` with its default input checks, called as
  ``update(ids, rewards, discount=functional.spo_discount(D))``;
* ``spo unchecked``: the same with ``check_values=False``;
* ``spo compiled`` (with --compile): ``torch.compile(fullgraph=True,
  dynamic=False)`` of that call, on a tracker with ``check_values=False``.

Both sides compute SPO's KL-adaptive rho, ``clamp(2 ** (-D / 0.06), 0.875,
0.96)``, from D inside the timed call. The baseline gets the ids as a Python
list and the rewards and D as float32 CPU tensors, prepared outside the
timed region (in the recipe the prompts are strings read from the batch).

Before timing, every case feeds the same ``--steps`` batches to all
trackers (prompts come back across steps) and raises unless, at every step,
each tensor tracker's advantages match the dict baseline's, and after the
last step alpha and beta of all P prompts do, to ``TOLERANCE`` (float32
rounding; the largest differences go into the JSON). Those steps also warm
the trackers up. Then each is timed on one fixed batch in ``--rounds``
rounds that take turns over all trackers, each round a median over many runs
(CPU: torch.utils.benchmark; CUDA: CUDA events); the median over rounds is
reported. Prints a Markdown table (milliseconds per update and the dict
baseline's time over each tracker's) and writes it, and JSON with the
machine, torch version, thread count, command and every round, to --out: a
fresh temporary directory unless --out names one, printed at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import torch
from absl import app, flags

from rail_interview.stat_tracking import functional, presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import describe_machine, time_cpu, time_cuda  # noqa: E402  pylint: disable=wrong-import-position

from baselines import SpoDictTracker  # noqa: E402  pylint: disable=wrong-import-position

#: (N, P) cases: N distinct prompts of P per batch.
GRIDS: Dict[str, List[Tuple[int, int]]] = {
    "full": [(256, 1_000), (4096, 10_000), (32768, 100_000), (4096, 1_000_000)],
    "quick": [(16, 40), (64, 500)],
}

#: Largest difference from the dict baseline that counts as agreement (float32; relative and absolute).
TOLERANCE = 1e-5

#: Fraction of samples whose D is 0 (a prompt's first visit: rho = 0.96); the others D ~ U(0, MAX_DIVERGENCE).
FIRST_VISIT_FRACTION = 0.25
#: Largest D drawn: rho = 2 ** (-D / 0.06) crosses SPO's clamp [0.875, 0.96] between D = 0.0035 and 0.0116.
MAX_DIVERGENCE = 0.02

FLAGS = flags.FLAGS

#: (ids [N], rewards [N], divergence [N]) -> advantages [N].
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def spo_batch(num_samples: int, num_prompts: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An SPO batch: N distinct prompts (G = 1), binary rewards, a D per sample.

    Each prompt passes with a fixed rate (the same for every seed), so that
    its Beta state tracks something.

    Args:
        num_samples: N, at most P.
        num_prompts: P.
        seed: draws the prompts, the rewards and D.

    Returns:
        int64 [N] ids in [0, P) without repeats, float32 [N] rewards in {0, 1}
        and float32 [N] D >= 0, on the CPU.
    """
    pass_rate = torch.rand(num_prompts, generator=torch.Generator().manual_seed(12345))  # [P]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_prompts, generator=generator)[:num_samples]  # [N]
    rewards = (torch.rand(num_samples, generator=generator) < pass_rate[ids]).float()  # [N]
    divergence = torch.rand(num_samples, generator=generator) * MAX_DIVERGENCE  # [N]
    divergence[torch.rand(num_samples, generator=generator) < FIRST_VISIT_FRACTION] = 0.0
    return ids, rewards, divergence


def spo_step(tracker) -> Step:
    """The tracker's update with SPO's KL-adaptive discount computed from D.

    Args:
        tracker: from ``presets.spo``.

    Returns:
        ``(ids, rewards, divergence) -> tracker.update(ids, rewards, discount=spo_discount(divergence))``.
    """

    def step(ids: torch.Tensor, rewards: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
        """One update with rho = ``spo_discount(divergence)``; returns the advantages."""
        return tracker.update(ids, rewards, discount=functional.spo_discount(divergence))

    return step


def build_trackers(num_prompts: int, device: torch.device, compile_update: bool) -> Dict[str, Tuple[object, Step]]:
    """The tensor trackers to time, by result name: (the tracker, its step).

    Args:
        num_prompts: P.
        device: their device.
        compile_update: add ``spo_compiled``.

    Returns:
        ``spo``, ``spo_unchecked`` and, if asked, ``spo_compiled``.
    """
    trackers: Dict[str, Tuple[object, Step]] = {}
    checked = presets.spo(num_prompts, device=device)
    trackers["spo"] = checked, spo_step(checked)
    unchecked = presets.spo(num_prompts, device=device, check_values=False)
    trackers["spo_unchecked"] = unchecked, spo_step(unchecked)
    if compile_update:
        compiled = presets.spo(num_prompts, device=device, check_values=False)
        trackers["spo_compiled"] = compiled, torch.compile(spo_step(compiled), fullgraph=True, dynamic=False)
    return trackers


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference of two tensors, in float64 on the CPU."""
    return (got.detach().cpu().double() - expected.double()).abs().max().item()


def check_agreement(
    baseline: SpoDictTracker,
    trackers: Dict[str, Tuple[object, Step]],
    num_samples: int,
    num_prompts: int,
    steps: int,
    device: torch.device,
) -> Dict[str, Dict[str, float]]:
    """Feeds the same batches to the baseline and every tracker and raises if they disagree.

    Args:
        baseline: a fresh dict tracker.
        trackers: fresh tensor trackers, as ``build_trackers`` returns them.
        num_samples: N.
        num_prompts: P.
        steps: batches to feed.
        device: the tensor trackers' device.

    Returns:
        Per tracker, the largest absolute difference from the baseline of its
        advantages over all steps (``advantages``) and of alpha and beta over
        all prompts after the last step (``state``).

    Raises:
        AssertionError: if a tracker's advantages or state differ by more than ``TOLERANCE``.
    """
    diffs = {name: {"advantages": 0.0, "state": 0.0} for name in trackers}
    for seed in range(steps):
        ids, rewards, divergence = spo_batch(num_samples, num_prompts, seed)
        expected = baseline.update(ids.tolist(), rewards, divergence)
        on_device = ids.to(device), rewards.to(device), divergence.to(device)
        for name, (_, step) in trackers.items():
            got = step(*on_device).cpu()
            torch.testing.assert_close(
                got, expected, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m, n=name, s=seed: f"{n}, step {s}: {m}"
            )
            diffs[name]["advantages"] = max(diffs[name]["advantages"], _max_diff(got, expected))
    for field, table in (("alpha", baseline.prompt2alpha), ("beta", baseline.prompt2beta)):
        expected = torch.tensor([table[k] for k in range(num_prompts)], dtype=torch.float32)  # [P]
        for name, (tracker, _) in trackers.items():
            got = tracker.state_dict()[field].cpu()
            torch.testing.assert_close(
                got, expected, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m, n=name, f=field: f"{n}, {f}: {m}"
            )
            diffs[name]["state"] = max(diffs[name]["state"], _max_diff(got, expected))
    return diffs


def run_case(
    num_samples: int,
    num_prompts: int,
    device: torch.device,
    *,
    threads: int,
    min_run_time: float,
    rounds: int,
    steps: int,
    compile_update: bool,
) -> Dict[str, object]:
    """Checks agreement, then times every tracker on one case.

    Args:
        num_samples: N.
        num_prompts: P.
        device: the tensor trackers' device.
        threads: torch threads while timing on the CPU (the dict baseline's too).
        min_run_time: seconds of timed runs per tracker and round, at least.
        rounds: rounds of timing over all trackers.
        steps: batches of the agreement check (which also warm the trackers up).
        compile_update: time ``spo_compiled`` too.

    Returns:
        N, P, G, the largest differences of the check (``max_diff``), the
        median over rounds of each tracker's milliseconds per update
        (``dict_ms``, ``spo_ms``, ...) and every round's figure (``rounds``).
    """
    baseline = SpoDictTracker(num_prompts)
    trackers = build_trackers(num_prompts, device, compile_update)
    diffs = check_agreement(baseline, trackers, num_samples, num_prompts, steps, device)

    ids, rewards, divergence = spo_batch(num_samples, num_prompts, seed=steps)
    list_ids = ids.tolist()
    on_device = ids.to(device), rewards.to(device), divergence.to(device)
    host_timer = lambda fn: time_cpu(fn, threads, min_run_time)  # noqa: E731
    calls: Dict[str, Tuple[Callable[[], object], Callable[[Callable[[], object]], float]]] = {
        "dict_ms": ((lambda: baseline.update(list_ids, rewards, divergence)), host_timer)
    }
    tensor_timer = (lambda fn: time_cuda(fn, min_run_time)) if device.type == "cuda" else host_timer
    for name, (_, step) in trackers.items():
        calls[f"{name}_ms"] = (lambda step=step: step(*on_device)), tensor_timer

    # Rounds over all trackers in turn, so that a slow spell of the machine
    # hits every tracker alike; the median over rounds is reported.
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (call, time_call) in calls.items():
            times[name].append(1e3 * time_call(call))
    result: Dict[str, object] = {"N": num_samples, "P": num_prompts, "G": 1, "max_diff": diffs}
    for name, values in times.items():
        result[name] = statistics.median(values)
    result["rounds"] = times
    return result


def format_table(rows: List[Dict[str, object]]) -> str:
    """Formats results as a Markdown table: milliseconds per update and the dict baseline's time over each.

    Args:
        rows: as returned by ``run_case``.

    Returns:
        The table.
    """
    trackers = [name[: -len("_ms")] for name in ("spo_ms", "spo_unchecked_ms", "spo_compiled_ms") if name in rows[0]]
    header = ["N", "P", "dict ms"] + [f"{t.replace('_', ' ')} ms" for t in trackers]
    header += [f"dict / {t.replace('spo_', '')}" for t in trackers]
    header += ["max abs diff (advantages, alpha/beta)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * (len(header) - 1) + " :--- |"]
    for row in rows:
        cells = [f"{row['N']:,}", f"{row['P']:,}"]
        cells += [_ms(row[f"{name}_ms"]) for name in ["dict", *trackers]]
        cells += [f"{row['dict_ms'] / row[f'{t}_ms']:.1f}x" for t in trackers]
        diffs = row["max_diff"]
        cells.append(
            f"{max(d['advantages'] for d in diffs.values()):.1e}, {max(d['state'] for d in diffs.values()):.1e}"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds to three decimals, or one from 10 ms on."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def main(argv: List[str]) -> None:
    """Runs the grid, prints the table and writes the JSON and the table to ``--out``.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(FLAGS.threads)
    device = torch.empty(0, device=FLAGS.device).device
    grid = "quick" if FLAGS.quick else "full"
    min_run_time = min(FLAGS.min_run_time, 0.01) if FLAGS.quick else FLAGS.min_run_time
    rounds = min(FLAGS.rounds, 2) if FLAGS.quick else FLAGS.rounds
    machine = describe_machine(device, FLAGS.threads)
    summary = (
        f"{machine['gpu'] if 'gpu' in machine else machine['processor']}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {FLAGS.threads} thread(s), device {device}"
    )
    print(summary)
    rows = []
    for num_samples, num_prompts in GRIDS[grid]:
        rows.append(
            run_case(
                num_samples,
                num_prompts,
                device,
                threads=FLAGS.threads,
                min_run_time=min_run_time,
                rounds=rounds,
                steps=FLAGS.steps,
                compile_update=FLAGS.compile,
            )
        )
        print(
            f"  N={num_samples} P={num_prompts}: agree; "
            + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.endswith("_ms")),
            flush=True,
        )
    table = format_table(rows)
    print(table)
    if FLAGS.out != "":
        out = tempfile.mkdtemp(prefix="rail_interview_bench_spo_") if FLAGS.out is None else FLAGS.out
        os.makedirs(out, exist_ok=True)
        tag = re.sub(r"[^a-z0-9]+", "-", str(machine.get("gpu", device.type)).lower()).strip("-")
        stem = os.path.join(out, f"spo_{tag}_{grid}")
        command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
        with open(f"{stem}.json", "w", encoding="utf-8") as f:
            json.dump(
                {
                    "date": datetime.date.today().isoformat(),
                    "grid": grid,
                    "machine": machine,
                    "command": command,
                    "min_run_time_s": min_run_time,
                    "rounds": rounds,
                    "tolerance": TOLERANCE,
                    "results": rows,
                },
                f,
                indent=2,
            )
        with open(f"{stem}.md", "w", encoding="utf-8") as f:
            f.write(
                f"# SPO's per-prompt tracker, one update\n\n{datetime.date.today().isoformat()}, {summary}; "
                f"median over {rounds} round(s) of {min_run_time:g} s or more per tracker.\n"
                f"Command: `{command}`\n\n{table}\n"
            )
        print(f"Wrote {stem}.json and {stem}.md")


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that headline.py can import this module beside others)."""
    flags.DEFINE_bool("quick", False, "Tiny sizes, at most 0.01 s per timing and 2 rounds: a smoke test, not figures.")
    flags.DEFINE_string("device", "cpu", "The tensor trackers' device, cpu or cuda (the dict stays on the host).")
    flags.DEFINE_integer("threads", 1, "CPU threads for torch, the dict baseline's included.")
    flags.DEFINE_float("min_run_time", 0.4, "Seconds of timed runs per tracker, case and round, at least.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timing over all trackers; the median over rounds is reported.")
    flags.DEFINE_integer("steps", 6, "Batches fed to every tracker to check agreement, before timing.")
    flags.DEFINE_bool("compile", False, "Also time torch.compile(fullgraph=True) of the unchecked update.")
    flags.DEFINE_string(
        "out",
        None,
        "Directory for the JSON and Markdown results (default: a fresh temporary directory; "
        "--out=benchmarks/results writes the committed ones); empty to write none.",
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
