"""benchmarks/mutation.py without cosmic-ray: its command line, config and test selection (the run is not in CI)."""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "mutation.py"


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs_without_cosmic_ray():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "cosmic-ray" in result.stdout


def test_config_is_toml_with_the_modules_tests_and_workers(mutation):
    tomllib = pytest.importorskip("tomllib")
    modules = mutation.select_modules(REPO_ROOT)
    assert "rail_interview/stat_tracking/batch.py" in modules
    assert "rail_interview/stat_tracking/reference.py" not in modules
    tests = mutation.select_tests(REPO_ROOT)
    assert tests[0] == "rail_interview/stat_tracking" and "tests/test_buffer_tracker.py" in tests
    assert "tests/test_distributed.py" not in tests
    assert "tests/test_distributed.py" in mutation.unselected_tests(REPO_ROOT, tests)
    command = mutation.mutant_test_command(
        sys.executable, mutation.pytest_args(tests, node_ids=["tests/x.py::y"]), runner=None
    )
    text = mutation.build_config(
        modules, command, 60.0, ["http://127.0.0.1:1", "http://127.0.0.1:2"], mutation.excluded_operator_patterns()
    )
    config = tomllib.loads(text)["cosmic-ray"]
    assert config["module-path"] == modules and config["timeout"] == 60.0
    assert shlex.split(config["test-command"]) == command
    assert command[command.index("-k") + 1] == "not plot_script" and "-x" in command
    assert command[command.index("--deselect") + 1] == "tests/x.py::y"
    assert config["distributor"] == {
        "name": "http",
        "http": {"worker-urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]},
    }


def test_operator_filter_keeps_one_replacement_per_binary_operator(mutation):
    patterns = mutation.excluded_operator_patterns()

    def runs(name):
        return not mutation.is_excluded_operator(f"core/{name}", patterns)

    assert runs("ReplaceBinaryOperator_Add_Sub") and not runs("ReplaceBinaryOperator_Add_Mul")
    assert not runs("ReplaceBinaryOperator_Add_Sub_Extra")
    assert runs("ReplaceComparisonOperator_Lt_LtE") and runs("ReplaceComparisonOperator_Lt_GtE")
    assert not runs("ReplaceComparisonOperator_Lt_Eq") and not runs("ReplaceComparisonOperator_Eq_Is")
    assert runs("ReplaceUnaryOperator_Delete_Not") and not runs("ReplaceUnaryOperator_USub_Invert")
    assert runs("NumberReplacer") and runs("AddNot") and runs("ZeroIterationForLoop")


def test_dimension_zero_to_minus_one_is_noted_as_likely_equivalent(mutation):
    diff = "--- a/x.py\n+++ b/x.py\n-        n = ids.shape[0]\n+        n = ids.shape[ -1]\n"
    assert mutation.likely_equivalent("core/NumberReplacer", diff)
    assert mutation.likely_equivalent("core/NumberReplacer", diff.replace("[ -1]", "[ 1]")) is None
    assert mutation.likely_equivalent("core/NumberReplacer", "+    x.clamp(min= -1)\n") is None


def test_fork_server_runs_pytest_in_the_callers_directory_and_returns_its_exit_code(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_passes():\n    assert True\n")
    (tmp_path / "test_b.py").write_text("def test_fails():\n    assert 1 == 2\n")
    sock = tmp_path / "server.sock"
    serve = f"import runpy, sys; runpy.run_path({str(SCRIPT)!r})['serve'](sys.argv[1], preload=('pytest',))"
    env = {**os.environ, "RAIL_MUTATION_SERVER": str(sock)}

    def client(*args):
        return subprocess.run(
            [sys.executable, str(SCRIPT), "_pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    server = subprocess.Popen([sys.executable, "-c", serve, str(sock)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        passed, failed = client("test_a.py"), client("test_b.py")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert passed.returncode == 0 and "1 passed" in passed.stdout and "fork server" not in passed.stdout
    assert failed.returncode == 1 and "assert 1 == 2" in failed.stdout
    fallback = client("test_b.py")  # no server any more: the client runs pytest itself, and says so
    assert fallback.returncode == 1 and "fork server unavailable" in fallback.stdout
