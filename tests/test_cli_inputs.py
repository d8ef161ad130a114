"""Command-line inputs of scripts/compare.py and the benchmarks: mistakes are refused in one line before any work,
the benchmarks that train are quiet by default, and no default output lands in the repository's committed results."""

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPARE = REPO_ROOT / "scripts" / "compare.py"
COMMITTED_RESULTS = [REPO_ROOT / "docs" / "results", REPO_ROOT / "benchmarks" / "results"]

# Tiny runs, in case a mistake were not refused and the comparison ran after all.
TINY = [
    "--seeds=1",
    "--workers=1",
    "--config.num_epochs=5",
    "--config.problem.num_prompts=8",
    "--config.sample_batch_size=32",
    "--config.device=cpu",
]

# (arguments, the flag the error must name, what it must say is allowed)
BAD_COMPARE_ARGUMENTS = {
    "no_seeds": (["--seeds=0"], "--seeds", ">= 1"),
    "decay_above_one": (["--ema_decays=1.5"], "--ema_decays", "open interval (0, 1)"),
    "decay_zero": (["--ema_decays=0.5,0"], "--ema_decays", "open interval (0, 1)"),
    "buffer_size_zero": (["--buffer_sizes=4,0"], "--buffer_sizes", "whole numbers >= 1"),
    "no_workers": (["--workers=0"], "--workers", ">= 1"),
    "unknown_method": (
        ["--methods=batch,ppo"],
        "--methods",
        "choose from ddpo, trl_grpo, verl_grpo, verl_rloo, flow_grpo, spo, buffer, ema, batch, grpo",
    ),
    "buffer_sizes_without_buffer": (
        ["--methods=batch,ema,grpo", "--buffer_sizes=4,8"],
        "--buffer_sizes",
        "add 'buffer' or METHOD+buffer to --methods",
    ),
    "ema_decays_without_ema": (
        ["--methods=batch,buffer", "--ema_decays=0.5"],
        "--ema_decays",
        "add 'ema' or METHOD+ema to --methods",
    ),
    "unknown_fallback": (
        ["--methods=grpo", "--config.stat_tracking.fallback=rawx"],
        "fallback",
        "fallback must be one of 'batch', 'raw', 'zero'; got 'rawx'",
    ),
    "unknown_config_field": (["--config.bogus=1"], "bogus", "no such config field"),
    "out_is_a_file": (["--out=/dev/null"], "--out", "must be a directory"),
}


def _snapshot(directories):
    """Path -> sha256 of every file under ``directories``."""
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for directory in directories
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Runs compare.py once for every case of BAD_COMPARE_ARGUMENTS, all at once, and returns what each did."""
    processes = {}
    for case, (arguments, _, _) in BAD_COMPARE_ARGUMENTS.items():
        directory = tmp_path_factory.mktemp(case)
        command = [
            sys.executable,
            str(COMPARE),
            *TINY,
            f"--out={directory / 'out'}",
            f"--logdir={directory / 'runs'}",
            *arguments,  # last, so that the case's flags win
        ]
        processes[case] = (
            directory,
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory),
        )
    results = {}
    for case, (directory, process) in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[case] = directory, process.returncode, stdout, stderr
    return results


@pytest.mark.parametrize("case", sorted(BAD_COMPARE_ARGUMENTS))
def test_compare_refuses_a_bad_argument_in_one_line_before_any_work(refused, case):
    _, flag, allowed = BAD_COMPARE_ARGUMENTS[case]
    directory, returncode, stdout, stderr = refused[case]
    assert returncode != 0, stdout + stderr
    assert "Traceback" not in stderr, stderr
    (error,) = [line for line in stderr.splitlines() if flag in line]  # one line names the flag ...
    assert allowed in error, stderr  # ... and what it allows
    assert len(stderr.strip().splitlines()) <= 2, stderr  # absl adds one line of "--helpshort" advice; no usage dump
    assert not (directory / "runs").exists() and not (directory / "out").exists()  # nothing was trained or written
    assert "[1/" not in stderr


def test_compare_writes_outside_the_repository_without_out(tmp_path):
    """Run from the repository root as the README does: without --out the results go to a fresh temporary
    directory (TMPDIR here), and the committed results stay as they are."""
    before = _snapshot(COMMITTED_RESULTS)
    result = subprocess.run(
        [
            sys.executable,
            str(COMPARE),
            "--methods=batch,rloo+buffer,grpo+ema",
            "--buffer_sizes=2",
            "--ema_decays=0.5",
            f"--logdir={tmp_path / 'runs'}",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    (out,) = re.findall(r"^Wrote results.md, results.csv and curves.png to (.+)$", result.stdout, flags=re.MULTILINE)
    out = pathlib.Path(out).resolve()
    assert REPO_ROOT not in out.parents and tmp_path.resolve() in out.parents
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.csv", "results.md"]
    table = (out / "results.md").read_text()
    for name in ("batch", "rloo+buffer K=2 m=2", "grpo+ema 0.5"):
        assert f"| {name} |" in table
    assert _snapshot(COMMITTED_RESULTS) == before


def test_bench_trackers_writes_outside_the_repository_without_out(tmp_path):
    before = _snapshot(COMMITTED_RESULTS)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "bench_trackers.py"),
            "--grid=quick",
            "--min_run_time=0.01",
            "--rounds=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    (written,) = re.findall(r"^Wrote (.+\.json)$", result.stdout, flags=re.MULTILINE)
    written = pathlib.Path(written).resolve()
    assert REPO_ROOT not in written.parents and tmp_path.resolve() in written.parents
    assert written.name == "trackers_cpu_quick.json" and written.is_file()
    assert _snapshot(COMMITTED_RESULTS) == before


# What training logs for every run, at INFO: its run directory, progress and final lines.
_PROGRESS = re.compile(r"(loop|metrics)\.py:\d+\]|Run directory|final_reward|epochs/s")


def _bench(script, *args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )


def test_bench_train_is_quiet_unless_verbose():
    tiny = ["--sizes=default", "--epochs=20", "--dict_epochs=5", "--repeats=1"]
    quiet = _bench("bench_train.py", *tiny)
    assert quiet.returncode == 0, quiet.stderr
    assert "| default | dict (host, DDPO-style) | 5 |" in quiet.stdout
    assert not _PROGRESS.search(quiet.stdout + quiet.stderr), quiet.stdout + quiet.stderr
    verbose = _bench("bench_train.py", *tiny, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert len(re.findall(r"loop\.py:\d+\] Run directory", verbose.stderr)) == 4  # one per run
    assert "| default | dict (host, DDPO-style) | 5 |" in verbose.stdout


def test_bench_stats_log_is_quiet_by_default():
    result = _bench("bench_stats_log.py", "--repeats=1", "--methods=buffer", "--config.num_epochs=20")
    assert result.returncode == 0, result.stderr
    assert "| buffer |" in result.stdout
    assert not _PROGRESS.search(result.stdout + result.stderr), result.stdout + result.stderr
