"""Smoke tests: the benchmark scripts run, check agreement and write their results; their baselines and sync counter."""

import hashlib
import importlib
import importlib.util
import json
import pathlib
import random
import re
import statistics
import subprocess
import sys
import zlib

import pytest
import torch

from system_references import SpoBetaTracker

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )


def test_bench_trackers_quick_grid(tmp_path):
    result = _run("bench_trackers.py", "--grid=quick", "--min_run_time=0.01", "--rounds=2", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("trackers_cpu_quick.json")
    data = json.loads(path.read_text())
    assert data["machine"]["torch_threads"] == 1
    assert [(r["N"], r["P"], r["K"]) for r in data["results"]] == [(64, 8, 4), (300, 50, 8)]
    for row in data["results"]:
        assert all(row[key] > 0 for key in ("buffer_ms", "ema_ms", "ddpo_ms", "reference_ms"))
        assert all(len(times) == 2 for times in row["rounds"].values())
    assert "| ddpo ms |" in result.stdout.replace("| N | P | K ", "")


def test_bench_train_and_stats_log_run(tmp_path):
    result = _run("bench_train.py", "--sizes=default", "--epochs=20", "--dict_epochs=5", "--repeats=1")
    assert result.returncode == 0, result.stderr
    assert "| default | dict (host, DDPO-style) | 5 |" in result.stdout
    result = _run("bench_stats_log.py", "--repeats=1", "--methods=buffer", "--config.num_epochs=20")
    assert result.returncode == 0, result.stderr
    assert "| buffer |" in result.stdout


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)


def _first_revision_with_ab_trackers():
    """The commit that added ab_trackers.py: the oldest package it was written for, older than HEAD."""
    commits = _git("log", "--diff-filter=A", "--format=%H", "--", "benchmarks/ab_trackers.py").stdout.split()
    if not commits or commits[-1] == _git("rev-parse", "HEAD").stdout.strip():
        pytest.skip("needs the git history before HEAD (a full clone, not a shallow one)")
    return commits[-1]


# Runs ab_trackers.py with torch's Timer wrapped, so that every timing is also
# reported on stderr: which package's tracker was timed, a hash of the source
# file it came from, and the median it measured (seconds).
_SPY = """
import hashlib, runpy, sys
import torch.utils.benchmark as benchmark

class SpyTimer(benchmark.Timer):
    def __init__(self, *args, globals=None, **kwargs):
        self.module = sys.modules[type(globals["update"].__self__).__module__]
        super().__init__(*args, globals=globals, **kwargs)

    def blocked_autorange(self, *args, **kwargs):
        measurement = super().blocked_autorange(*args, **kwargs)
        with open(self.module.__file__, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        print("TIMED", self.module.__name__, digest, repr(measurement.median), file=sys.stderr)
        return measurement

benchmark.Timer = SpyTimer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_CASE = re.compile(r"N=\s*(\d+) P=\s*(\d+): old ([\d.]+) ms, new ([\d.]+) ms, new / old ([\d.]+)")


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the git history")
def test_ab_trackers_times_an_older_revision_against_the_working_tree():
    rev = _first_revision_with_ab_trackers()
    rounds = 2
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SPY,
            str(REPO_ROOT / "benchmarks" / "ab_trackers.py"),
            f"--rev={rev}",
            f"--rounds={rounds}",
            "--min_run_time=0.01",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"BufferStatTracker: {rev} (old) against the working tree (new)" in result.stdout
    cases = _CASE.findall(result.stdout)
    assert [(int(n), int(p)) for n, p, *_ in cases] == [(256, 64), (4096, 1_000), (4096, 1_000_000), (32768, 4096)]
    timed = [line.split()[1:] for line in result.stderr.splitlines() if line.startswith("TIMED ")]
    assert len(timed) == len(cases) * rounds * 2
    # Every round times the revision's tracker ("old"), then the working tree's ("new").
    old_module, new_module = timed[0][0], timed[1][0]
    assert old_module.startswith("rail_interview_at_rev.") and new_module.startswith("rail_interview.")
    assert [name for name, *_ in timed] == [old_module, new_module] * (len(cases) * rounds)
    # The old side runs the revision's source (renamed), the new side the working tree's.
    old_path = old_module.replace("rail_interview_at_rev", "rail_interview").replace(".", "/") + ".py"
    old_source = (
        subprocess.run(["git", "show", f"{rev}:{old_path}"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .replace("rail_interview", "rail_interview_at_rev")
    )
    new_source = pathlib.Path(importlib.import_module(new_module).__file__).read_bytes()
    assert {digest for _, digest, _ in timed[0::2]} == {hashlib.sha256(old_source.encode()).hexdigest()}
    assert {digest for _, digest, _ in timed[1::2]} == {hashlib.sha256(new_source).hexdigest()}
    # Each line reports the medians over rounds of what was timed, and their ratio.
    for case, (*_, old_ms, new_ms, ratio) in enumerate(cases):
        medians = [float(seconds) for *_, seconds in timed[case * rounds * 2 : (case + 1) * rounds * 2]]
        expected_old, expected_new = (1e3 * statistics.median(medians[side::2]) for side in (0, 1))
        assert float(old_ms) == pytest.approx(expected_old, abs=6e-4)
        assert float(new_ms) == pytest.approx(expected_new, abs=6e-4)
        assert float(ratio) == pytest.approx(expected_new / expected_old, abs=6e-3)
        assert 0.1 < float(ratio) < 10  # the same work, a few commits apart


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the git history")
def test_ab_trackers_refuses_an_unknown_revision():
    result = _run("ab_trackers.py", "--rev=no-such-revision", "--rounds=1", "--min_run_time=0.01")
    assert result.returncode != 0
    assert "no-such-revision" in result.stderr
    assert "new / old" not in result.stdout


def _load_benchmark_module(name):
    """Imports benchmarks/<name>.py (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baselines():
    return _load_benchmark_module("baselines")


@pytest.fixture(scope="module")
def sync_counter():
    return _load_benchmark_module("sync_counter")


# Groups {0: [1, 3]}, {1: [2, 4, 9]} and the singleton {2: [5]}, interleaved:
# means 2 and 5, sample stds sqrt(2) and sqrt(13); the singleton takes mean 0, std 1.
_HAND_IDS = [1, 0, 2, 1, 0, 1]
_HAND_REWARDS = [2.0, 1.0, 5.0, 4.0, 3.0, 9.0]
_HAND_CASES = {
    "grpo": ({}, [-3 / 13**0.5, -1 / 2**0.5, 5 / (1 + 1e-6), -1 / 13**0.5, 1 / 2**0.5, 4 / 13**0.5]),
    "dr_grpo": ({"norm_by_std": False}, [-3.0, -1.0, 5.0, -1.0, 1.0, 4.0]),
    "rloo": ({"leave_one_out": True}, [-4.5, -2.0, 5.0, -1.5, 2.0, 6.0]),
}


@pytest.mark.parametrize("function", ["python_loop_grpo", "index_add_grpo"])
@pytest.mark.parametrize("case", sorted(_HAND_CASES))
def test_grpo_baselines_hand_computed(baselines, function, case):
    kwargs, expected = _HAND_CASES[case]
    rewards = torch.tensor(_HAND_REWARDS)
    advantages = getattr(baselines, function)(torch.tensor(_HAND_IDS), rewards, **kwargs)
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert rewards.tolist() == _HAND_REWARDS  # the input is not written to


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_samples,num_prompts", [(1, 1), (7, 3), (64, 8), (300, 250), (1000, 37)])
@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-4}, {"norm_by_std": False}, {"leave_one_out": True}])
def test_grpo_baselines_agree(baselines, dtype, num_samples, num_prompts, kwargs):
    generator = torch.Generator().manual_seed(num_samples)
    ids = torch.randint(num_prompts, (num_samples,), generator=generator)  # uneven groups, singletons, gaps
    rewards = (torch.randn(num_samples, generator=generator) * 3 + 1).to(dtype)
    rewards[: num_samples // 4] = rewards[0]  # some zero-variance groups
    expected = baselines.python_loop_grpo(ids, rewards, **kwargs)
    assert expected.dtype == dtype
    for num_groups in (None, num_prompts):
        torch.testing.assert_close(
            baselines.index_add_grpo(ids, rewards, num_groups=num_groups, **kwargs), expected, rtol=1e-5, atol=1e-5
        )


def test_sync_counter_counts_host_reads(sync_counter, baselines):
    x = torch.arange(6.0)
    with sync_counter.SyncCounter() as counter:
        y = (x * 2 + 1).sqrt().cumsum(0)[torch.tensor([0, 2])]
        z = torch.zeros(3).index_add_(0, torch.tensor([0, 1, 1]), x[:3])
        torch.where(x > 2, x, y.sum())
    assert counter.count == 0
    with sync_counter.SyncCounter() as counter:
        x.sum().item()
        x.tolist()
    assert counter.count == 2 and dict(counter.calls) == {"item": 1, "tolist": 1}
    assert sync_counter.count_syncs(lambda: [x[x > 2], int(z.max()), torch.unique(x), bool(x[0] > 0)]) == 4
    ids, rewards = torch.tensor([0, 1, 0, 1]), torch.rand(4)
    assert sync_counter.count_syncs(lambda: baselines.python_loop_grpo(ids, rewards)) == 1  # ids.tolist()
    assert sync_counter.count_syncs(lambda: baselines.index_add_grpo(ids, rewards)) == 1  # int(ids.max())
    assert sync_counter.count_syncs(lambda: baselines.index_add_grpo(ids, rewards, num_groups=2)) == 0


def test_bench_groups_quick(tmp_path):
    out = tmp_path / "groups.md"
    result = _run("bench_groups.py", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert header[3:5] == ["method", "ms / update"]
    assert len(rows) == 2 * 11 and {row[0].strip("| ") for row in rows} == {"32", "64"}
    for row in rows:
        method, milliseconds, syncs, bitwise, diff = row[3], float(row[4]), int(row[7]), row[8], row[9]
        assert milliseconds > 0 and bitwise == "yes", row
        assert diff == "n/a |" if "ema" in method else diff.endswith(" ok |"), row
        assert syncs == (0 if method.startswith(("presets", "AdvantageTracker")) or "P given" in method else 1), row
    assert "| presets.verl_rloo |" in result.stdout


def test_bench_spo_quick(tmp_path):
    result = _run("bench_spo.py", "--quick", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "spo_cpu_quick.json").read_text())
    assert data["machine"]["torch_threads"] == 1 and data["rounds"] == 2 and data["tolerance"] <= 1e-5
    assert [(r["N"], r["P"], r["G"]) for r in data["results"]] == [(16, 40, 1), (64, 500, 1)]
    for row in data["results"]:
        assert all(row[key] > 0 for key in ("dict_ms", "spo_ms", "spo_unchecked_ms"))
        assert all(len(times) == 2 for times in row["rounds"].values())
        # Both tensor trackers were checked against the dict baseline, advantages and alpha/beta.
        assert set(row["max_diff"]) == {"spo", "spo_unchecked"}
        assert all(0 <= diff <= data["tolerance"] for d in row["max_diff"].values() for diff in d.values())
    table = (tmp_path / "spo_cpu_quick.md").read_text()
    assert "| N | P | dict ms | spo ms | spo unchecked ms | dict / spo | dict / unchecked |" in table
    assert table.split("\n\n")[-1].strip() in result.stdout  # the file holds the printed table


_MEMORIES = ("none", "buffer", "ema")
_ORDERS = ("sum_then_normalize", "normalize_then_sum")


def test_bench_multi_reward_quick(tmp_path):
    result = _run("bench_multi_reward.py", "--quick", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "multi_reward_cpu_quick.json").read_text())
    assert data["machine"]["torch_threads"] == 1 and data["rounds"] == 2 and data["tolerance"] <= 1e-5
    assert data["reward_weights"] == [1.0, 0.5, 0.25, 2.0] and data["check_values"] is True
    cases = [(r["N"], r["P"], r["memory"], r["order"]) for r in data["results"]]
    assert cases == [(n, p, m, o) for n, p in [(32, 8), (96, 40)] for m in _MEMORIES for o in _ORDERS]
    for row in data["results"]:
        assert all(row[f"{name}_ms"] > 0 for name in ("one", "by_hand", "loop")) and "one_compiled_ms" not in row
        assert all(len(times) == 2 for times in row["rounds"].values())
        # Both by-hand variants were checked against the one tracker, advantages and state.
        assert set(row["max_diff"]) == {"by_hand", "loop"}
        assert all(0 <= diff <= data["tolerance"] for d in row["max_diff"].values() for diff in d.values())
    table = (tmp_path / "multi_reward_cpu_quick.md").read_text()
    assert "| N | P | memory | order | one ms | by hand ms | loop ms | by hand / one | loop / one |" in table
    assert "Command: `python benchmarks/bench_multi_reward.py --quick" in table
    assert table.split("\n\n")[-1].strip() in result.stdout  # the file holds the printed table


# Runs bench_multi_reward.py with the tracker's final whitening nudged, so that the one tracker of
# several rewards disagrees with the single-reward trackers combined by hand (normalize_then_sum).
_NUDGED_WHITENING = """
import runpy, sys
from rail_interview.stat_tracking import tracker
normalized_advantages = tracker.normalized_advantages
tracker.normalized_advantages = lambda *args, **kwargs: normalized_advantages(*args, **kwargs) * 1.001
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_bench_multi_reward_refuses_to_time_variants_that_disagree():
    script = str(REPO_ROOT / "benchmarks" / "bench_multi_reward.py")
    result = subprocess.run(
        [sys.executable, "-c", _NUDGED_WHITENING, script, "--quick", "--out="],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "AssertionError: N=32 P=8 none normalize_then_sum, by_hand, step 0: Tensor-likes are not close" in (
        result.stderr
    )
    assert "| N | P |" not in result.stdout


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the git history")
def test_bench_multi_reward_ab_checks_and_times_a_revision_against_the_working_tree(tmp_path):
    result = _run("bench_multi_reward.py", "--quick", "--ab_rev=HEAD", "--steps=2", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "HEAD (" in result.stdout and ", old) against the working tree (rail_interview of HEAD " in result.stdout
    data = json.loads((tmp_path / "ab_single_reward_cpu.json").read_text())
    assert data["rev"] == "HEAD" and data["rev_hash"] == data["head"] and data["rounds"] == 2
    assert [(r["memory"], r["N"], r["P"]) for r in data["results"]] == [
        (m, n, p) for m in _MEMORIES for n, p in [(32, 8), (96, 40)]
    ]
    for row in data["results"]:
        assert all(len(times) == 2 for times in row["rounds"].values())
        assert row["new_over_old"] == pytest.approx(row["new_ms"] / row["old_ms"])
        assert row["round_ratio_min"] <= row["round_ratio_max"] and 0.1 < row["new_over_old"] < 10
    table = (tmp_path / "ab_single_reward_cpu.md").read_text()
    assert "| memory | N | P | old ms | new ms | new / old | per-round new / old (min, max) |" in table
    assert table.split("\n\n")[-1].strip() in result.stdout


# Runs bench_spo.py with the dict baseline's state nudged after every update
# (one prompt's alpha), so that the agreement check must fail.
_NUDGED = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import baselines
update = baselines.SpoDictTracker.update

def nudged(self, prompts, rewards, divergence=None):
    advantages = update(self, prompts, rewards, divergence)
    self.prompt2alpha[prompts[0]] += 1e-3
    return advantages

baselines.SpoDictTracker.update = nudged
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_bench_spo_refuses_to_time_trackers_that_disagree():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _NUDGED,
            str(REPO_ROOT / "benchmarks"),
            str(REPO_ROOT / "benchmarks" / "bench_spo.py"),
            "--quick",
            "--out=",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert re.search(
        r"AssertionError: spo(_unchecked)?, (step \d+|alpha|beta): Tensor-likes are not close", result.stderr
    )
    assert "| N | P |" not in result.stdout


@pytest.mark.parametrize("rho_type", ["kl", "constant"])
@pytest.mark.parametrize("repeats", [False, True])
def test_spo_dict_baseline_is_the_recipe_transcription(baselines, rho_type, repeats):
    # A seed of the parameters that is the same in every process (hash() of a str is not:
    # PYTHONHASHSEED), so that a failure reproduces.
    rng = random.Random(zlib.crc32(repr((rho_type, repeats)).encode()))
    num_prompts = 12
    reference = SpoBetaTracker({p: [] for p in range(num_prompts)}, offline_n=0, rho_type=rho_type, rho_value=0.9)
    dict_tracker = baselines.SpoDictTracker(num_prompts, rho_type=rho_type, rho_value=0.9)
    for _ in range(30):
        size = rng.randint(2, 10)
        if repeats:
            prompts = [rng.randrange(num_prompts) for _ in range(size)]
        else:
            prompts = rng.sample(range(num_prompts), size)
        rewards = [float(rng.random() < 0.4) for _ in prompts]
        divergence = [rng.choice([0.0, rng.random() * 0.02, rng.random()]) for _ in prompts]
        expected = reference.step(prompts, rewards, divergence if rho_type == "kl" else None)
        got = dict_tracker.update(prompts, torch.tensor(rewards), torch.tensor(divergence))
        assert got.dtype == torch.float32  # float32 as upstream; the reference is float64
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        for mine, theirs in ((dict_tracker.prompt2alpha, reference.alpha), (dict_tracker.prompt2beta, reference.beta)):
            assert list(mine) == list(theirs)
            torch.testing.assert_close(torch.tensor(list(mine.values())), torch.tensor(list(theirs.values())))


@pytest.fixture(scope="module")
def op_counts():
    return _load_benchmark_module("op_counts")


def test_op_counter_counts_each_dispatched_op_once(op_counts):
    x = torch.arange(6.0)
    with op_counts.OpCounter() as counter:
        y = torch.where(x > 2, x, 0).sum()
    assert counter.counts == {"gt.Scalar": 1, "where.self": 1, "scalar_tensor.default": 1, "sum.default": 1}
    assert counter.total == 4 and float(y) == 12.0


def test_op_counts_are_the_same_every_run_and_value_checks_add_ops(op_counts):
    build, num_rewards, keys = op_counts.CASES["verl_grpo"]
    first = op_counts.count_update(build, num_rewards, keys, 64, 16, torch.device("cpu"), False)
    assert first == op_counts.count_update(build, num_rewards, keys, 64, 16, torch.device("cpu"), False)
    checked = op_counts.count_update(build, num_rewards, keys, 64, 16, torch.device("cpu"), True)
    assert sum(checked.values()) > sum(first.values()) > 0
    # Several rewards, each normalised, dispatch more ops than one reward of the same preset, but no Python loop
    # over them: the count does not grow with C.
    four = op_counts.CASES["trl_grpo, 4 rewards, normalize_then_sum"]
    assert sum(op_counts.count_update(*four, 64, 16, torch.device("cpu"), False).values()) > 0
    # Hashed keys already in the table take the key table's short path: fewer ops than keys new to it.
    held, new = (op_counts.CASES[f"verl_grpo, hashed keys, all {kind}"] for kind in ("held", "new"))
    cpu = torch.device("cpu")
    assert sum(op_counts.count_update(*held, 64, 16, cpu, False).values()) < sum(
        op_counts.count_update(*new, 64, 16, cpu, False).values()
    )


def test_op_counts_script_writes_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "op_counts.py"), f"--out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "op_counts_cpu.json").read_text())["rows"]
    assert {row["case"] for row in rows} == set(_load_benchmark_module("op_counts").CASES)
    assert all(0 < row["ops"] < row["ops_with_checks"] for row in rows)


def test_memory_floor_script_reports_both_sizes_and_the_ratio(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_memory_floor.py"), f"--out={tmp_path}"]
    result = subprocess.run(
        [*command, "--rounds=1", "--min_run_time=0.01"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "memory_floor_cpu.json").read_text())["rows"]
    assert [row["memory"] for row in rows] == ["buffer", "ema"]
    for row in rows:
        assert all(row[key] > 0 for key in ("floor_small_ms", "floor_large_ms", "update_small_ms", "update_large_ms"))
        assert row["extra_ratio"] == pytest.approx(row["update_extra_ms"] / row["floor_extra_ms"]) or (
            row["floor_extra_ms"] <= 0
        )
        between = row["floor_between_extra_ms"]
        assert row["extra_ratio_between"] == pytest.approx(row["update_extra_ms"] / between) or between <= 0


_HEADLINE_FIGURES = [
    "small batch, eager",
    "large batch",
    "group mode, verl",
    "group mode, TRL",
    "hashed keys",
    "P-scaling over the memory floor",
    "P-scaling over the floor between updates",
    "SPO",
    "several rewards (C = 4)",
]


def test_headline_quick_writes_every_row_and_column(tmp_path):
    result = _run("headline.py", "--quick", "--nocompile", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "headline_cpu.json").read_text())
    assert report["quick"] is True and report["rounds"] == 1 and report["compiled_with"] == "not run"
    assert report["machine"]["torch_threads"] == 1 and report["clock"] == "thread_cpu"
    rows = report["rows"]
    figures = [row["figure"] for row in rows]
    assert sorted(set(figures)) == sorted(_HEADLINE_FIGURES) and "small batch, compiled" not in figures
    # Per figure: 2 trackers; 2 trackers x 2 sizes; 2 sizes; 2 trackers x 2 sizes; 2 memories, twice; 2 sizes; 1.
    assert [figures.count(f) for f in _HEADLINE_FIGURES] == [2, 4, 2, 2, 4, 2, 2, 2, 1]
    columns = {"figure", "ours", "baseline", "sizes", "ours_ms", "baseline_ms", "ratio", "ratio_of", "target", "met"}
    for row in rows:
        assert columns <= set(row), row
        assert row["ratio_of"] == ("baseline / ours" if row["speedup"] else "ours / baseline")
        assert (row["target"] is None) == (row["met"] is None) or row["ratio"] != row["ratio"]  # NaN: no verdict
        assert all(len(times) == 1 for times in row["rounds_ms"].values())
        assert (row["agreement"] is None) == row["figure"].startswith("P-scaling over the")
    targets = {row["figure"]: row["target"] for row in rows}
    assert targets["small batch, eager"] == 10 and targets["group mode, verl"] == 2
    assert targets["hashed keys"] == 1.5 and targets["P-scaling over the memory floor"] == 1.3
    assert targets["P-scaling over the floor between updates"] == 1.3
    table = (tmp_path / "headline_cpu.md").read_text()
    header = "| figure | ours | baseline | sizes | ours ms | baseline ms | ratio | ratio of | target | met | agree |"
    assert header in table and "Command: `python benchmarks/headline.py --quick --nocompile" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 2  # and the header, the rule
    assert table.strip() in result.stdout  # the file holds the printed table


def test_bench_keys_stream_and_markdown_run_on_a_small_table():
    bench_keys = _load_benchmark_module("bench_keys")
    result = bench_keys.stream(num_keys=3000, num_rows=500, num_samples=100)
    assert result["updates"] == 30 and result["median_ms"] > 0
    # Every tensor of the key table counts: more than the id tracker's state, by at least the rows' keys and stamps.
    assert result["state_bytes"] >= result["id_state_bytes"] + 16 * 500
    table = bench_keys.markdown(dict(grid=[], stream=result, key_functions=dict(prompt_keys_ms=1.0, token_keys_ms=1.0)))
    assert "3,000 keys through 500 rows, N = 100" in table


def test_headline_ratio_is_the_median_of_the_rounds_paired_ratios():
    headline = _load_benchmark_module("headline")
    speedup = headline.Row("f", "o", "b", "s", ("ours",), ("base",), True, 2.0, None)
    (result,) = headline.evaluate([speedup], [{"ours": [1.0, 2.0, 1.0], "base": [3.0, 2.0, 2.5]}])
    assert result["rounds_ratio"] == [3.0, 1.0, 2.5] and result["ratio"] == 2.5 and result["met"] is True
    assert result["ours_ms"] == 1.0 and result["baseline_ms"] == 2.5  # medians over rounds
    # Extra costs, each a difference of two calls per round; a round whose baseline extra is not
    # positive has no ratio (NaN), which sorts above every number.
    cost = headline.Row("f", "o", "b", "s", ("big", "small"), ("floor big", "floor small"), False, 1.3, None)
    times = {"big": [2.0, 2.0, 2.0], "small": [1.0] * 3, "floor big": [1.5, 1.0, 1.4], "floor small": [1.0] * 3}
    (result,) = headline.evaluate([cost], [times])
    ratios = result["rounds_ratio"]
    assert ratios[0] == 2.0 and ratios[1] != ratios[1] and ratios[2] == pytest.approx(2.5)
    assert result["ratio"] == pytest.approx(2.5) and result["met"] is False
    timing = _load_benchmark_module("timing")
    assert timing.median_nan_last([float("nan"), float("nan"), 1.0]) != timing.median_nan_last([1.0])
    assert timing.median_nan_last([3.0, float("nan"), 1.0, 2.0]) == 2.5


def test_time_interleaved_times_each_call_in_turns():
    timing = _load_benchmark_module("timing")
    calls = []

    def cheap():
        calls.append("cheap")

    def costly():
        calls.append("costly")
        sum(range(20_000))

    fast, slow = timing.time_interleaved([cheap, costly], 0.02)
    assert 0 < fast < slow
    assert calls.count("costly") >= 5 * 2 + 2  # a warm-up, a sizing call, then 5 blocks at least, each after a call
    timed = calls[4:]  # the blocks: all of one call's block, then the other's, in turns
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 2 * 5 - 1


def test_bench_forks_times_each_algorithm_of_a_fork_on_checked_updates():
    result = _run(
        "bench_forks.py",
        "--fork=add_at",
        "--cases=verl_grpo:64:16:4,ddpo:64:100:8",
        "--rounds=1",
        "--min_run_time=0.01",
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| verl_grpo") or line.startswith("| ddpo")]
    assert len(table) == 2
    assert all(float(cell) > 0 for line in table for cell in line.strip("| ").split(" | ")[4:])
    assert _run("bench_forks.py", "--fork=nothing").returncode != 0
    bench_forks = _load_benchmark_module("bench_forks")
    with pytest.raises(ValueError, match="multiple of G"):
        bench_forks.parse_cases("ddpo:10:100:4")
