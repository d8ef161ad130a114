"""Smoke tests: the benchmark scripts run, check agreement, and write their results."""

import json
import pathlib
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


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the git history")
def test_ab_trackers_compares_a_revision_with_the_working_tree():
    result = _run("ab_trackers.py", "--rev=HEAD", "--rounds=1", "--min_run_time=0.01")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("new / old") == 4
