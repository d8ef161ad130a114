"""Smoke tests: the benchmark scripts run, check agreement, and write their results."""

import hashlib
import importlib
import json
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600)


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
        [sys.executable, "-c", _SPY, str(REPO_ROOT / "benchmarks" / "ab_trackers.py"), f"--rev={rev}",
         f"--rounds={rounds}", "--min_run_time=0.01"],
        capture_output=True, text=True, timeout=600,
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
    old_source = subprocess.run(["git", "show", f"{rev}:{old_path}"], cwd=REPO_ROOT, capture_output=True,
                                check=True).stdout.decode().replace("rail_interview", "rail_interview_at_rev")
    new_source = pathlib.Path(importlib.import_module(new_module).__file__).read_bytes()
    assert {digest for _, digest, _ in timed[0::2]} == {hashlib.sha256(old_source.encode()).hexdigest()}
    assert {digest for _, digest, _ in timed[1::2]} == {hashlib.sha256(new_source).hexdigest()}
    # Each line reports the medians over rounds of what was timed, and their ratio.
    for case, (*_, old_ms, new_ms, ratio) in enumerate(cases):
        medians = [float(seconds) for *_, seconds in timed[case * rounds * 2:(case + 1) * rounds * 2]]
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
