"""The GPU check runs as a dry run on a CPU and reports every check it plans for a GPU."""

import json
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"

TRACKER_CASES = [
    f"{kind}/{size}"
    for kind in ("buffer", "ema", "batch", "trl_grpo", "rloo_buffer", "hashed_buffer", "hashed_grpo")
    for size in ("64x8x4", "300x50x8")
]
NEEDS_CUDA = (
    [f"sync_free/{case}" for case in TRACKER_CASES] + [f"cuda_graph/{case}" for case in TRACKER_CASES] + ["cuda_tests"]
)
RUNS_ON_CPU = [f"determinism/{case}" for case in TRACKER_CASES] + [
    "train/batch",
    "train/buffer",
    "train/ema",
    "train/pass_fail",
    "bench_trackers",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_dry_run_on_cpu_reports_every_check(tmp_path):
    result = _run("--device=cpu", "--quick", f"--out={tmp_path}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert report["complete"] and report["device"]["type"] == "cpu" and report["torch"] == torch.__version__
    assert {"date", "cuda", "command"} <= report.keys()
    checks = {entry["name"]: entry for entry in report["checks"]}
    assert sorted(checks) == sorted(NEEDS_CUDA + RUNS_ON_CPU)
    for name in NEEDS_CUDA:
        assert checks[name]["passed"] is None and checks[name]["reason"].startswith("needs CUDA"), checks[name]
    for name in RUNS_ON_CPU:
        assert checks[name]["passed"] is True and checks[name]["reason"] is None, checks[name]
    assert all(entry["seconds"] >= 0 for entry in report["checks"])
    assert report["counts"] == {"passed": len(RUNS_ON_CPU), "failed": 0, "skipped": len(NEEDS_CUDA)}
    # The CUDA tests were found and skipped, not missed.
    assert checks["cuda_tests"]["details"]["counts"]["skipped"] > 0
    for method in ("batch", "buffer", "ema", "pass_fail"):
        details = checks[f"train/{method}"]["details"]
        assert math.isfinite(details["final_reward"]) and details["reproducible"] and details["device"] == "cpu"
    assert pathlib.Path(checks["bench_trackers"]["details"]["json"]) == tmp_path / "trackers_cpu_quick.json"
    # One line per check, then the totals.
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 + len(checks) and lines[-1].startswith(f"{len(RUNS_ON_CPU)} passed, 0 failed")


def test_a_failing_check_does_not_stop_the_others(tmp_path):
    # With no time for any subprocess, every training run fails; the checks before and after still run.
    result = _run("--device=cpu", "--quick", "--checks=determinism,train", "--timeout=0", f"--out={tmp_path}")
    assert result.returncode == 1
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    outcomes = {entry["name"]: (entry["passed"], entry["reason"]) for entry in report["checks"]}
    assert outcomes == {
        **{f"determinism/{case}": (True, None) for case in TRACKER_CASES},
        **{f"train/{m}": (False, "timed out after 0 s") for m in ("batch", "buffer", "ema", "pass_fail")},
    }
    assert report["complete"] and report["counts"] == {"passed": len(TRACKER_CASES), "failed": 4, "skipped": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    result = _run(f"--out={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "no CUDA device available" in line and "--device=cpu" in line
    assert not list(tmp_path.iterdir())


def test_a_full_length_training_run_is_held_to_its_floor():
    """check_train's floor, which the --quick dry runs above skip: a run below it fails, and no floor passes."""
    code = textwrap.dedent(
        f"""
        import importlib.util
        import torch
        from absl import flags
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
        flags.FLAGS(["gpu_check"])
        tiny = ["--config.problem.num_prompts=8", "--config.sample_batch_size=32", "--config.log_every=5",
                "--config.checkpoint_every=0"]
        gpu_check.TRAINING_RUNS = {{"high": (tiny, 5, 1e9), "none": (tiny, 5, None)}}
        try:
            gpu_check.check_train("high", torch.device("cpu"), quick=False)
        except gpu_check.CheckFailed as error:
            print("high:", error)
        print("none:", gpu_check.check_train("none", torch.device("cpu"), quick=False)["reproducible"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("high: final_reward ") and lines[0].endswith("is below 1000000000.0"), lines
    assert lines[1] == "none: True"
