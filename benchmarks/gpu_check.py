"""Checks on a GPU what only a GPU can check, and writes one JSON report.

Usage:
    python benchmarks/gpu_check.py                          # on a CUDA machine: every check
    python benchmarks/gpu_check.py --quick                  # tiny sizes and budgets
    python benchmarks/gpu_check.py --checks=sync_free,cuda_graph,determinism
    python benchmarks/gpu_check.py --device=cpu --quick --out=/tmp/gpu_check   # dry run without a GPU

Every check runs even when another fails; the report is rewritten after each
check, so a machine taken back half-way still leaves the checks done so far.
The checks, in the order they run (names as in the report):

* ``sync_free/<tracker>/<N>x<P>x<K>``: each tracker (buffer, ema, batch, trl_grpo, rloo_buffer, and the
  hashed-key hashed_buffer and hashed_grpo) at a
  small and a large size, built with ``check_values=False`` and warmed up,
  then updated under ``torch.cuda.set_sync_debug_mode("error")``: any host
  sync in ``update`` is an error, with the algorithms CUDA picks by itself
  and with each algorithm of ``stat_tracking.ops`` forced in turn.
* ``cuda_graph/<tracker>/<N>x<P>x<K>``: ``tracker.update(static_ids,
  static_rewards)`` captured in a ``torch.cuda.CUDAGraph`` after a warm-up on
  a side stream, replayed over 8 batches copied into the static inputs, and
  compared with an eager twin fed the same batches: advantages after every
  batch and the final ``state_dict``. Also times one replay against one eager
  update.
* ``determinism/<tracker>/<N>x<P>x<K>``: two eager trackers fed the same
  batches end with bit-for-bit identical advantages and state.
* ``cuda_tests``: the tests in tests/ marked ``skipif(reason="needs a CUDA
  device")``, run by ``pytest -m "skipif(reason='needs a CUDA device')"`` in a
  subprocess (pytest 8.3 or later); a CUDA test skipped on CUDA is a failure.
* ``train/<run>``: ``scripts/train.py --config.device=<device>`` for each
  method of the distance problem (batch, buffer, ema) and for the pass/fail
  problem's config (GRPO with a buffer), twice: records ``final_reward`` and
  times, and checks that the two runs wrote identical ``metrics.csv`` and
  stats log, and (at full length) that the per-prompt runs reach their
  floor, ``problems.BAD_FINAL_REWARD``: a ``final_reward`` above -20 on the
  distance problem after 1000 epochs, and above 0.2 on the pass/fail one
  after 300 (it starts near 0.1), which no CPU run at the defaults missed.
* ``bench_trackers``: ``benchmarks/bench_trackers.py --device=<device>``
  (headline grid; with --quick the quick grid), which writes its own JSON
  next to this report.

Expected runtime on one GPU: about 3 minutes, most of it the tracker benchmark
and eight process start-ups; with --quick about a minute (estimates: no GPU
has run it yet). The dry run takes about 30 seconds on a 2-core CPU.

The report, ``<out>/gpu_check_<device-name>.json`` (for example
``gpu_check_nvidia-h100-80gb-hbm3.json``; ``gpu_check_cpu.json`` for a dry
run), holds the device (name, capability, memory), torch, CUDA and Python
versions, the date, the command, and for each check its name, ``passed``
(true, false, or null for skipped), ``reason`` (why it failed or was skipped),
``seconds`` and ``details`` (timings, the subprocess command and its summary,
the traceback's tail on an error). One line per check is printed as well.

Exit status: 0 when no check failed (skips allowed), 1 when one did, 2 when no
CUDA device is available and ``--device=cpu`` was not given. With
``--device=cpu`` the same code runs as a dry run: the sync-debug and CUDA-graph
checks report skipped ("needs CUDA"), the CUDA tests skip, and the rest runs
on the CPU.
"""

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout, installed or not

import torch  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from rail_interview import problems  # noqa: E402  pylint: disable=wrong-import-position
from rail_interview.stat_tracking import (  # noqa: E402  pylint: disable=wrong-import-position
    BatchStatTracker,
    BufferStatTracker,
    EmaStatTracker,
    StatTracker,
    ops,
    presets,
)

#: Check groups, in the order they run: the in-process ones first, as they are
#: the fastest and need nothing but torch.
CHECK_GROUPS = ("sync_free", "cuda_graph", "determinism", "cuda_tests", "train", "bench")

#: Tracker sizes (N samples, P prompts, K buffer slots): full run and --quick.
TRACKER_SIZES: Dict[bool, List[Tuple[int, int, int]]] = {
    False: [(256, 64, 32), (32768, 4096, 32)],
    True: [(64, 8, 4), (300, 50, 8)],
}

#: Training runs, by name: train.py's flags beyond device, epochs and logdir; the number of
#: epochs of a full-length run; and the final_reward a full-length run must exceed, its
#: problem's ``problems.BAD_FINAL_REWARD`` (None: no floor, as the batch baseline has none).
#: No CPU run at the defaults fell below a floor.
TRAINING_RUNS: Dict[str, Tuple[List[str], int, Optional[float]]] = {
    "batch": (["--config.stat_tracking.method=batch"], 1000, None),
    "buffer": (["--config.stat_tracking.method=buffer"], 1000, problems.BAD_FINAL_REWARD["distance"]),
    "ema": (["--config.stat_tracking.method=ema"], 1000, problems.BAD_FINAL_REWARD["distance"]),
    "pass_fail": (
        [f"--config={os.path.join(REPO_ROOT, 'rail_interview', 'configs', 'pass_fail.py')}"],
        300,
        problems.BAD_FINAL_REWARD["pass_fail"],
    ),
}

#: pytest -m expression that selects the CUDA tests: in tests/ they are marked
#: ``pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")``
#: (matching a mark's keyword arguments needs pytest 8.3 or later).
CUDA_TESTS_MARK = "skipif(reason='needs a CUDA device')"

#: Epochs of every training run with --quick (no floor is checked then).
QUICK_TRAINING_EPOCHS = 20

_DEVICE = flags.DEFINE_enum(
    "device", None, ["cuda", "cpu"], "Device to check; unset means cuda. cpu is a dry run of the same code."
)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny tracker sizes, 20 training epochs and the quick benchmark grid.")
_CHECKS = flags.DEFINE_list("checks", list(CHECK_GROUPS), f"Check groups to run, from: {', '.join(CHECK_GROUPS)}.")
flags.register_validator(
    "checks", lambda groups: set(groups) <= set(CHECK_GROUPS), f"--checks takes names from: {', '.join(CHECK_GROUPS)}"
)
_TIMEOUT = flags.DEFINE_integer("timeout", 300, "Seconds each subprocess (pytest, train.py, benchmark) may run.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(REPO_ROOT, "benchmarks", "results"), "Directory for the report and the benchmark's JSON."
)


class CheckFailed(Exception):
    """Raised by a check that ran and found a problem.

    Args:
        reason: one line saying what went wrong.
        details: what the check measured before it failed.
    """

    def __init__(self, reason: str, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(reason)
        self.details = details or {}


class CheckSkipped(Exception):
    """Raised by a check that cannot run on this device.

    Args:
        reason: one line saying why, starting with what is missing.
        details: what the check did run, if anything.
    """

    def __init__(self, reason: str, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(reason)
        self.details = details or {}


def run_check(name: str, check: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Runs one check and turns its outcome into a report entry; never raises.

    Args:
        name: the check's name in the report.
        check: returns the check's details when it passes, raises
            ``CheckSkipped`` to skip and anything else to fail.

    Returns:
        ``{"name", "passed", "reason", "seconds", "details"}``: ``passed`` is
        True, False or None (skipped); ``reason`` says why it failed or was
        skipped (None when it passed); an unexpected error's traceback tail is
        in ``details["traceback"]``.

    >>> run_check("ok", lambda: {"x": 1})["passed"]
    True
    >>> run_check("bad", lambda: 1 / 0)["reason"]
    'ZeroDivisionError: division by zero'
    """
    start = time.perf_counter()
    passed: Optional[bool] = True
    reason: Optional[str] = None
    try:
        details = check()
    except CheckSkipped as skip:
        passed, reason, details = None, str(skip), skip.details
    except CheckFailed as failure:
        passed, reason, details = False, str(failure), failure.details
    except Exception as error:  # pylint: disable=broad-except
        first_line = (str(error).strip().splitlines() or [""])[0]
        passed, reason = False, f"{type(error).__name__}: {first_line}"
        details = {"traceback": _tail(traceback.format_exc(), lines=20)}
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.set_sync_debug_mode("default")
    return {
        "name": name,
        "passed": passed,
        "reason": reason,
        "seconds": round(time.perf_counter() - start, 3),
        "details": details,
    }


def _tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    """The last ``lines`` lines of ``text``, at most ``chars`` characters."""
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def _display(command: List[str]) -> str:
    """A command as one would type it in the repository root: ``python scripts/train.py ...``."""
    shown = ["python" if command[0] == sys.executable else command[0]]
    shown += [os.path.relpath(arg, REPO_ROOT) if arg.startswith(REPO_ROOT + os.sep) else arg for arg in command[1:]]
    return " ".join(f'"{arg}"' if " " in arg else arg for arg in shown)


# ---------------------------------------------------------------- trackers

#: Tracker factories by name; every one is built with check_values=False, the sync-free hot path.
TRACKERS: Dict[str, Callable[[int, int, torch.device], StatTracker]] = {
    "buffer": lambda num_prompts, buffer_size, device: BufferStatTracker(
        num_prompts, buffer_size, max(1, min(16, buffer_size // 2)), device=device, check_values=False
    ),
    "ema": lambda num_prompts, buffer_size, device: EmaStatTracker(
        num_prompts, 0.7, max(1, min(16, buffer_size // 2)), device=device, check_values=False
    ),
    "batch": lambda num_prompts, buffer_size, device: BatchStatTracker(num_prompts, device=device, check_values=False),
    # The GRPO family: TRL's in-batch GRPO (NaN as unscorable, the spare row
    # for invalid samples) and RLOO over a buffer.
    "trl_grpo": lambda num_prompts, buffer_size, device: presets.trl_grpo(
        num_prompts, device=device, check_values=False
    ),
    "rloo_buffer": lambda num_prompts, buffer_size, device: presets.verl_rloo(
        num_prompts,
        memory="buffer",
        buffer_size=buffer_size,
        min_count=max(2, min(16, buffer_size // 2)),
        fallback="batch",
        device=device,
        check_values=False,
    ),
    # Hashed keys: the LRU key table's fixed-shape path (top-k eviction). The
    # ids in [0, P) are keys like any others; half the table's rows, so that
    # keys are evicted and batches can overflow.
    "hashed_buffer": lambda num_prompts, buffer_size, device: BufferStatTracker(
        max(1, num_prompts // 2),
        buffer_size,
        max(1, min(16, buffer_size // 2)),
        device=device,
        check_values=False,
        keys="hashed",
    ),
    "hashed_grpo": lambda num_prompts, buffer_size, device: presets.trl_grpo(
        max(1, num_prompts // 2), memory="ema", device=device, check_values=False, keys="hashed"
    ),
}


def random_batches(
    num_batches: int, num_samples: int, num_prompts: int, *, seed: int, device: torch.device
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Draws batches uniformly over the prompts, on the host, then moves them.

    Args:
        num_batches: how many batches.
        num_samples: N, samples per batch.
        num_prompts: P.
        seed: seed of the host generator, so every device sees the same batches.
        device: where the batches end up.

    Returns:
        ``num_batches`` pairs of int64 ids [N] and float32 rewards [N].
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(num_prompts, (num_samples,), generator=generator)  # [N]
        rewards = torch.randn(num_samples, generator=generator) * 10 - 50  # [N]
        batches.append((ids.to(device), rewards.to(device)))
    return batches


def check_sync_free(kind: str, size: Tuple[int, int, int], device: torch.device) -> Dict[str, Any]:
    """Updates a warmed-up tracker under ``torch.cuda.set_sync_debug_mode("error")``.

    First with the algorithms the device picks by itself, then with each
    algorithm of ``ops.ALGORITHMS`` forced in turn (a user may force any of
    them), so that no path syncs with the host.

    Args:
        kind: a key of ``TRACKERS``.
        size: (N, P, K).
        device: on a CPU the updates run without the sync-debug mode and the
            check reports skipped.

    Returns:
        The number of updates checked, and the outcome per forced algorithm.

    Raises:
        CheckSkipped: on a CPU.
        CheckFailed: when an update synchronises with the host, under the
            automatic or a forced algorithm, or an advantage is not finite.
    """
    num_samples, num_prompts, buffer_size = size
    tracker = TRACKERS[kind](num_prompts, buffer_size, device)
    batches = random_batches(6, num_samples, num_prompts, seed=0, device=device)
    for ids, rewards in batches[:3]:  # warm-up: partly full buffers, lazy CUDA initialisation done
        tracker.update(ids, rewards)
    choices = [{}] + [
        {operation: algorithm} for operation, algorithms in ops.ALGORITHMS.items() for algorithm in algorithms
    ]
    outcomes: Dict[str, str] = {}
    for choice in choices:
        label = ",".join(f"{op}={algo}" for op, algo in choice.items()) or "automatic"
        with ops.forced_algorithms(**choice):
            if device.type != "cuda":
                advantages = [tracker.update(ids, rewards) for ids, rewards in batches[3:]]
            else:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    advantages = [tracker.update(ids, rewards) for ids, rewards in batches[3:]]
                except RuntimeError as error:
                    outcomes[label] = f"host sync: {str(error).splitlines()[0]}"
                    continue
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finite = all(bool(torch.isfinite(a).all()) for a in advantages)
        outcomes[label] = "ok" if finite else "an advantage is not finite"
    if device.type != "cuda":
        raise CheckSkipped(
            "needs CUDA (torch.cuda.set_sync_debug_mode); the same updates ran on cpu without it",
            {"updates_run": len(choices) * (len(batches) - 3), "algorithms": outcomes},
        )
    failed = {label: outcome for label, outcome in outcomes.items() if outcome != "ok"}
    if failed:
        raise CheckFailed(f"not sync-free or not finite: {failed}", {"algorithms": outcomes})
    return {"updates_checked": len(choices) * (len(batches) - 3), "algorithms": outcomes}


def _cuda_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Mean milliseconds per call of ``fn`` on the current stream, with CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def check_cuda_graph(kind: str, size: Tuple[int, int, int], device: torch.device) -> Dict[str, Any]:
    """Captures ``update`` in a CUDA graph and holds its replays to an eager twin.

    Args:
        kind: a key of ``TRACKERS``.
        size: (N, P, K).
        device: must be CUDA.

    Returns:
        Whether replays matched the eager twin bit for bit (they must match
        within ``torch.testing.assert_close`` tolerances), and milliseconds
        per eager update and per replay on one batch.

    Raises:
        CheckSkipped: on a CPU.
        AssertionError: when a replay's advantages or the final state differ.
    """
    if device.type != "cuda":
        raise CheckSkipped("needs CUDA")
    num_samples, num_prompts, buffer_size = size
    batches = random_batches(8, num_samples, num_prompts, seed=1, device=device)
    eager = TRACKERS[kind](num_prompts, buffer_size, device)
    graphed = TRACKERS[kind](num_prompts, buffer_size, device)
    static_ids = batches[0][0].clone()  # [N]
    static_rewards = batches[0][1].clone()  # [N]
    initial = graphed.state_dict()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs a warm-up on a side stream
        for _ in range(3):
            graphed.update(static_ids, static_rewards)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(initial)  # copies in place, so the captured addresses stay valid
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_advantages = graphed.update(static_ids, static_rewards)  # [N]
    graphed.load_state_dict(initial)
    bitwise = True
    for step, (ids, rewards) in enumerate(batches):
        static_ids.copy_(ids)
        static_rewards.copy_(rewards)
        graph.replay()
        expected = eager.update(ids, rewards)
        torch.testing.assert_close(static_advantages, expected, msg=lambda m, s=step: f"batch {s}: {m}")
        bitwise = bitwise and torch.equal(static_advantages, expected)
    graphed_state, eager_state = graphed.state_dict(), eager.state_dict()
    assert graphed_state.keys() == eager_state.keys(), (sorted(graphed_state), sorted(eager_state))
    for name, tensor in eager_state.items():
        torch.testing.assert_close(graphed_state[name], tensor, msg=lambda m, n=name: f"state {n!r}: {m}")
        bitwise = bitwise and torch.equal(graphed_state[name], tensor)
    return {
        "replays": len(batches),
        "bitwise_equal": bitwise,
        "eager_update_ms": _cuda_ms(lambda: eager.update(static_ids, static_rewards)),
        "graph_replay_ms": _cuda_ms(graph.replay),
    }


def check_determinism(kind: str, size: Tuple[int, int, int], device: torch.device) -> Dict[str, Any]:
    """Feeds the same batches to two eager trackers and compares them bit for bit.

    Args:
        kind: a key of ``TRACKERS``.
        size: (N, P, K).
        device: any device.

    Returns:
        The number of batches and whether torch's deterministic algorithms
        were on (they are not, here: this is the tracker's own determinism).

    Raises:
        CheckFailed: naming the first batch or state tensor that differs.
    """
    num_samples, num_prompts, buffer_size = size
    batches = random_batches(6, num_samples, num_prompts, seed=2, device=device)
    runs = []
    for _ in range(2):
        tracker = TRACKERS[kind](num_prompts, buffer_size, device)
        advantages = [tracker.update(ids, rewards) for ids, rewards in batches]
        runs.append((advantages, tracker.state_dict()))
    (first_advantages, first_state), (second_advantages, second_state) = runs
    for step, (a, b) in enumerate(zip(first_advantages, second_advantages)):
        if not torch.equal(a, b):
            raise CheckFailed(
                f"advantages of batch {step} differ between two runs, by up to {(a - b).abs().max().item():.3g}"
            )
    for name, tensor in first_state.items():
        if not torch.equal(tensor, second_state[name]):
            raise CheckFailed(f"state {name!r} differs between two runs")
    return {"batches": len(batches), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


# ---------------------------------------------------------------- subprocesses


def _run(command: List[str], device: torch.device) -> Tuple[str, float]:
    """Runs a command from the repository root and returns its output.

    Args:
        command: the command line.
        device: for a CPU dry run the subprocess sees no GPU either.

    Returns:
        stdout and stderr together, and the wall-clock seconds.

    Raises:
        CheckFailed: when it times out or exits non-zero, with the output's tail.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    details: Dict[str, Any] = {"command": _display(command)}
    try:
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=_TIMEOUT.value, check=False
        )
    except subprocess.TimeoutExpired as error:
        partial = (error.stdout or b"") + (error.stderr or b"")
        details["output_tail"] = _tail(partial.decode(errors="replace") if isinstance(partial, bytes) else partial)
        raise CheckFailed(f"timed out after {_TIMEOUT.value} s", details) from None
    output = result.stdout + result.stderr
    if result.returncode != 0:
        details["output_tail"] = _tail(output)
        raise CheckFailed(f"exit status {result.returncode}", details)
    return output, time.perf_counter() - start


def check_cuda_tests(device: torch.device) -> Dict[str, Any]:
    """Runs the tests marked as needing CUDA, with pytest in a subprocess.

    Args:
        device: on a CPU they all skip and the check reports skipped.

    Returns:
        The command, pytest's summary line and its counts.

    Raises:
        CheckFailed: when pytest fails, finds no CUDA test, or skips one on CUDA.
        CheckSkipped: on a CPU, when every CUDA test skipped.
    """
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-m",
        CUDA_TESTS_MARK,
        os.path.join(REPO_ROOT, "tests"),
    ]
    try:
        output, _ = _run(command, device)
    except CheckFailed as failure:
        if "exit status 5" in str(failure):  # pytest: no test collected
            raise CheckFailed(f"no test in tests/ is marked {CUDA_TESTS_MARK}", failure.details) from None
        raise
    summary = next(
        (
            line.strip("= ")
            for line in reversed(output.splitlines())
            if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)", line)
        ),
        "",
    )
    counts = {
        word.rstrip("s"): int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", summary)
    }
    details = {"command": _display(command), "summary": summary, "counts": counts}
    if device.type != "cuda":
        raise CheckSkipped(f"needs CUDA: the {counts.get('skipped', 0)} CUDA tests skipped on cpu", details)
    if counts.get("skipped"):
        details["output_tail"] = _tail(output)
        raise CheckFailed(f"{counts['skipped']} CUDA test(s) skipped on a CUDA machine", details)
    return details


def _run_outputs(run_dir: str) -> Dict[str, bytes]:
    """metrics.csv and every stats log file of a run, by path within the run."""
    outputs = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, run_dir)
            if relative == "metrics.csv" or relative.startswith("stats" + os.sep):
                with open(path, "rb") as f:
                    outputs[relative] = f.read()
    return outputs


def check_train(name: str, device: torch.device, quick: bool) -> Dict[str, Any]:
    """Runs ``scripts/train.py`` twice as ``TRAINING_RUNS[name]`` says and compares the runs.

    Args:
        name: a key of ``TRAINING_RUNS``.
        device: ``config.device``.
        quick: ``QUICK_TRAINING_EPOCHS`` epochs and no floor, instead of the
            run's full length and floor.

    Returns:
        The first run's ``final_reward``, ``train_seconds`` (training loop),
        ``epochs_per_second`` and ``wall_seconds`` (the whole process), the
        second run's ``train_seconds``, and the command.

    Raises:
        CheckFailed: when a run fails, runs elsewhere than ``device``, ends with
            a non-finite final_reward, the two runs' metrics or stats log
            differ, or a full-length run ends below its floor.
    """
    flags_, full_epochs, floor = TRAINING_RUNS[name]
    num_epochs = QUICK_TRAINING_EPOCHS if quick else full_epochs
    summaries, outputs = [], []
    with tempfile.TemporaryDirectory() as logdir:
        for run in range(2):
            command = [
                sys.executable,
                os.path.join(REPO_ROOT, "scripts", "train.py"),
                *flags_,
                f"--config.device={device.type}",
                f"--config.num_epochs={num_epochs}",
                f"--logdir={os.path.join(logdir, str(run))}",
            ]
            _, wall_seconds = _run(command, device)
            (run_name,) = os.listdir(os.path.join(logdir, str(run)))
            run_dir = os.path.join(logdir, str(run), run_name)
            with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
                summaries.append(dict(json.load(f), wall_seconds=wall_seconds))
            outputs.append(_run_outputs(run_dir))
    first = summaries[0]
    details = {
        key: first[key] for key in ("final_reward", "train_seconds", "epochs_per_second", "wall_seconds", "device")
    }
    details["second_train_seconds"] = summaries[1]["train_seconds"]
    details["command"] = _display(command[:-1])
    if not first["device"].startswith(device.type):
        raise CheckFailed(f"trained on {first['device']}, not {device.type}", details)
    if not math.isfinite(first["final_reward"]):
        raise CheckFailed(f"final_reward is {first['final_reward']}", details)
    differing = sorted(
        path for path in outputs[0].keys() | outputs[1].keys() if outputs[0].get(path) != outputs[1].get(path)
    )
    details["reproducible"] = not differing
    if differing:
        raise CheckFailed(f"two runs with one seed wrote different {', '.join(differing[:3])}", details)
    if not quick and floor is not None and first["final_reward"] < floor:
        raise CheckFailed(f"final_reward {first['final_reward']:.2f} is below {floor}", details)
    return details


def check_bench(device: torch.device, out_dir: str, quick: bool) -> Dict[str, Any]:
    """Runs ``benchmarks/bench_trackers.py`` on the device, writing next to the report.

    Args:
        device: ``--device`` of the benchmark.
        out_dir: ``--out`` of the benchmark.
        quick: the quick grid, one short round; else the headline grid.

    Returns:
        The command, the path of the benchmark's JSON and its median
        milliseconds per update for each case.

    Raises:
        CheckFailed: when the benchmark fails (it also checks that every
            tracker agrees with the reference first) or writes no JSON.
    """
    grid = ["--grid=quick", "--rounds=1", "--min_run_time=0.01"] if quick else ["--grid=headline", "--rounds=3"]
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, "benchmarks", "bench_trackers.py"),
        f"--device={device.type}",
        f"--out={out_dir}",
        *grid,
    ]
    output, _ = _run(command, device)
    written = re.findall(r"^Wrote (.+\.json)$", output, flags=re.MULTILINE)
    if not written:
        raise CheckFailed("the benchmark wrote no JSON", {"output_tail": _tail(output)})
    with open(written[-1], encoding="utf-8") as f:
        results = json.load(f)["results"]
    return {
        "command": _display(command),
        "json": written[-1],
        "ms_per_update": [{key: value for key, value in row.items() if key != "rounds"} for row in results],
    }


# ---------------------------------------------------------------- report


def describe_device(device: torch.device) -> Dict[str, Any]:
    """The device's type, name and, on CUDA, capability and memory.

    Args:
        device: the device checked.

    Returns:
        ``{"type", "name"}``, plus ``capability`` and ``memory_gib`` on CUDA.
    """
    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine()}
    properties = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": properties.name,
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
    }


def planned_checks(
    device: torch.device, groups: List[str], quick: bool, out_dir: str
) -> List[Tuple[str, Callable[[], Dict[str, Any]]]]:
    """The checks of the chosen groups, by name, in the order they run.

    Args:
        device: the device checked.
        groups: names from ``CHECK_GROUPS``.
        quick: tiny sizes and budgets.
        out_dir: where the benchmark writes its JSON.

    Returns:
        (name, check) pairs; each check takes no argument.
    """
    checks: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []
    per_tracker = {"sync_free": check_sync_free, "cuda_graph": check_cuda_graph, "determinism": check_determinism}
    for group in CHECK_GROUPS:
        if group not in groups:
            continue
        if group in per_tracker:
            for kind in TRACKERS:
                for size in TRACKER_SIZES[quick]:
                    checks.append(
                        (
                            f"{group}/{kind}/{'x'.join(map(str, size))}",
                            lambda f=per_tracker[group], k=kind, s=size: f(k, s, device),
                        )
                    )
        elif group == "cuda_tests":
            checks.append(("cuda_tests", lambda: check_cuda_tests(device)))
        elif group == "train":
            for name in TRAINING_RUNS:
                checks.append((f"train/{name}", lambda n=name: check_train(n, device, quick)))
        else:
            checks.append(("bench_trackers", lambda: check_bench(device, out_dir, quick)))
    return checks


def _status(entry: Dict[str, Any]) -> str:
    return {True: "PASS", False: "FAIL", None: "SKIP"}[entry["passed"]]


def main(argv: List[str]) -> int:
    """Runs the checks, writes the report and prints one line per check.

    Args:
        argv: leftover command-line arguments; there must be none.

    Returns:
        The exit status: 0 when no check failed, 1 when one did, 2 without CUDA.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _DEVICE.value != "cpu" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); for a dry run on the CPU: "
            f"python benchmarks/gpu_check.py --device=cpu --quick --out=/tmp/gpu_check",
            file=sys.stderr,
        )
        return 2
    device = torch.empty(0, device=_DEVICE.value or "cuda").device
    device_info = describe_device(device)
    slug = re.sub(r"[^a-z0-9]+", "-", device_info["name"].lower()).strip("-") if device.type == "cuda" else "cpu"
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, f"gpu_check_{slug}.json")
    report: Dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": device_info,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": _QUICK.value,
        "complete": False,
        "checks": [],
    }
    print(
        f"gpu_check on {device_info['name']} ({device}), torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"report: {path}",
        flush=True,
    )
    start = time.perf_counter()
    for name, check in planned_checks(device, _CHECKS.value, _QUICK.value, _OUT.value):
        entry = run_check(name, check)
        report["checks"].append(entry)
        print(f"{_status(entry)}  {name:<36} {entry['seconds']:8.2f} s  {entry['reason'] or ''}", flush=True)
        with open(path, "w", encoding="utf-8") as f:  # after each check, in case the machine goes away
            json.dump(report, f, indent=2)
    report["complete"] = True
    report["seconds"] = round(time.perf_counter() - start, 1)
    outcomes = [entry["passed"] for entry in report["checks"]]
    report["counts"] = {
        "passed": outcomes.count(True),
        "failed": outcomes.count(False),
        "skipped": outcomes.count(None),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(
        f"{report['counts']['passed']} passed, {report['counts']['failed']} failed, "
        f"{report['counts']['skipped']} skipped in {report['seconds']} s; wrote {path}"
    )
    return 1 if report["counts"]["failed"] else 0


if __name__ == "__main__":
    app.run(main)
