"""benchmarks/gpu_check.py on a CPU: its message without a GPU, its test runner, benchmark and report."""

import importlib.util
import json
import pathlib
import textwrap

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([f"--out={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gpu_check: no CUDA device") and torch.__version__ in line
    assert not list(tmp_path.iterdir())


def test_each_cuda_tests_outcome_is_read_and_unmarked_tests_are_left_out(gpu_check, tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.cuda
            def test_passes(record_property):
                record_property("kernel_launches", 12)
                record_property("replay_ms", 0.25)
                record_property("note", "graph")

            @pytest.mark.cuda
            def test_fails():
                assert 1 == 2

            @pytest.mark.cuda
            @pytest.mark.skipif(True, reason="needs a CUDA device")
            def test_skips():
                pass

            def test_not_a_cuda_test():
                pass
            """
        )
    )
    tests = gpu_check.run_tests(tmp_path, paths=["test_x.py"], cwd=tmp_path)
    outcomes = {test["name"]: test["outcome"] for test in tests["tests"]}
    assert outcomes == {
        "test_x::test_passes": "passed",
        "test_x::test_fails": "failed",
        "test_x::test_skips": "skipped",
    }
    assert tests["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1} and tests["exit_code"] == 1
    assert "assert 1 == 2" in next(t["message"] for t in tests["tests"] if t["outcome"] == "failed")
    # Figures a test records with record_property come back as numbers (or text), on that test only.
    properties = {test["name"]: test.get("properties") for test in tests["tests"]}
    assert properties["test_x::test_passes"] == {"kernel_launches": 12, "replay_ms": 0.25, "note": "graph"}
    assert properties["test_x::test_fails"] is None
    assert tests["command"].startswith("python -m pytest -m cuda") and tests["command"].endswith("test_x.py")


def test_the_gpu_checks_are_collected_and_skip_without_cuda(gpu_check, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU they run: benchmarks/gpu_check.py")
    tests = gpu_check.run_tests(tmp_path, paths=["tests/test_cuda.py", "tests/test_tracker_contract.py"])
    names = {test["name"].split("::")[0] for test in tests["tests"]}
    assert names == {"tests.test_cuda", "tests.test_tracker_contract"}
    assert tests["counts"]["skipped"] == len(tests["tests"]) > 100 and tests["exit_code"] == 0
    assert not gpu_check.passed({"tests": tests, "benchmark": {"ms_per_update": []}})  # skipped is not passed


def test_the_benchmark_runs_and_its_figures_are_read(gpu_check, tmp_path):
    benchmark = gpu_check.run_benchmark(tmp_path, quick=True, device="cpu")
    assert benchmark["exit_code"] == 0 and pathlib.Path(benchmark["json"]) == tmp_path / "trackers_cpu_quick.json"
    assert [(row["N"], row["P"], row["K"]) for row in benchmark["ms_per_update"]] == [(64, 8, 4), (300, 50, 8)]
    # The other benchmarks (SPO's tracker, several rewards) run too, each read under "more".
    assert set(benchmark["more"]) == {"bench_spo.py", "bench_multi_reward.py"}
    for script, run in benchmark["more"].items():
        assert run["exit_code"] == 0 and run["ms_per_update"], script


def test_a_failed_extra_benchmark_fails_the_check(gpu_check, monkeypatch, tmp_path):
    tests = {"command": "pytest", "exit_code": 0, "counts": {"passed": 1, "failed": 0, "error": 0}, "tests": []}
    tests["tests"] = [{"name": "tests.test_cuda::test_x", "outcome": "passed", "seconds": 0.1, "message": None}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "describe_device", lambda: {"name": "NVIDIA H200", "memory_gib": 139.8})
    monkeypatch.setattr(gpu_check, "run_tests", lambda out: tests)
    failed = {"command": "python benchmarks/bench_multi_reward.py", "exit_code": 1, "output_tail": "boom"}
    benchmark = {"command": "b", "exit_code": 0, "ms_per_update": [{"N": 256}], "more": {"x.py": failed}}
    monkeypatch.setattr(gpu_check, "run_benchmark", lambda out, quick: benchmark)
    assert gpu_check.main([f"--out={tmp_path}", "--quick"]) == 1


@pytest.mark.parametrize("outcome, status", [("passed", 0), ("failed", 1), ("skipped", 1)])
def test_the_report_holds_the_device_versions_tests_and_benchmark(gpu_check, monkeypatch, tmp_path, outcome, status):
    tests = {
        "command": "python -m pytest -m cuda tests",
        "exit_code": 0 if outcome != "failed" else 1,
        "counts": {"passed": int(outcome == "passed"), "failed": int(outcome == "failed"), "error": 0},
        "tests": [{"name": "tests.test_cuda::test_x", "outcome": outcome, "seconds": 0.1, "message": None}],
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "describe_device", lambda: {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1})
    monkeypatch.setattr(gpu_check, "run_tests", lambda out: tests)
    benchmark = {"command": "python benchmarks/bench_trackers.py", "exit_code": 0, "ms_per_update": [{"N": 256}]}
    monkeypatch.setattr(gpu_check, "run_benchmark", lambda out, quick: benchmark)
    assert gpu_check.main([f"--out={tmp_path}", "--quick"]) == status
    report = json.loads((tmp_path / "gpu_check_nvidia-h100-80gb-hbm3.json").read_text())
    assert report.keys() == {"date", "device", "torch", "cuda", "python", "quick", "tests", "benchmark", "passed"}
    assert report["device"]["name"] == "NVIDIA H100 80GB HBM3" and report["torch"] == torch.__version__
    assert report["tests"] == tests and report["benchmark"] == benchmark and report["passed"] is (status == 0)
