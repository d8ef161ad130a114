"""benchmarks/mutation.py and benchmarks/cosmic-ray.toml, without running a mutant (too slow for CI)."""

import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "mutation.py"
tomllib = pytest.importorskip("tomllib")  # Python 3.11 or later


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config():
    return tomllib.loads((REPO_ROOT / "benchmarks" / "cosmic-ray.toml").read_text())["cosmic-ray"]


def test_help_runs_without_cosmic_ray():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--workers" in result.stdout and "--dry-run" in result.stdout and "cosmic-ray" in result.stdout


def test_the_config_mutates_the_library_and_runs_tests_that_exist(config):
    assert (REPO_ROOT / config["module-path"]).is_dir() and config["distributor"] == {"name": "local"}
    assert config["excluded-modules"] == ["rail_interview/stat_tracking/reference.py"]
    assert all((REPO_ROOT / path).is_file() for path in config["excluded-modules"])
    assert config["timeout"] > 0
    command = shlex.split(config["test-command"])
    assert command[:3] == ["python", "-m", "pytest"] and "-x" in command
    assert command[command.index("-k") + 1] == "not plot_script"
    paths = [arg for arg in command[3:] if not arg.startswith("-") and "/" in arg]
    assert paths[0] == "rail_interview/stat_tracking" and "tests/test_tracker_contract.py" in paths
    assert [path for path in paths if not (REPO_ROOT / path).exists()] == [], "rename it in the config too"


def _kept_by_the_filter(config, name):
    """Whether cr-filter-operators keeps operator ``name``: it drops those that re.match an excluded pattern."""
    return not any(re.match(pattern, name) for pattern in config["filters"]["operators-filter"]["exclude-operators"])


def test_the_operator_filter_keeps_one_replacement_per_binary_operator(config):
    def runs(name):
        return _kept_by_the_filter(config, f"core/{name}")

    assert runs("ReplaceBinaryOperator_Add_Sub") and not runs("ReplaceBinaryOperator_Add_Mul")
    assert not runs("ReplaceBinaryOperator_Add_Sub_Extra")
    assert runs("ReplaceComparisonOperator_Lt_LtE") and runs("ReplaceComparisonOperator_Lt_GtE")
    assert not runs("ReplaceComparisonOperator_Lt_Eq") and not runs("ReplaceComparisonOperator_Eq_Is")
    assert runs("ReplaceUnaryOperator_Delete_Not") and not runs("ReplaceUnaryOperator_USub_Invert")
    assert runs("NumberReplacer") and runs("AddNot") and runs("ZeroIterationForLoop")


#: The replacements the config keeps, per operator family (its comment says why).
KEPT = {
    "ReplaceBinaryOperator": "Add_Sub Sub_Add Mul_Div Div_Mul FloorDiv_Div Mod_FloorDiv Pow_Mul BitOr_BitAnd "
    "BitAnd_BitOr BitXor_BitOr LShift_RShift RShift_LShift",
    "ReplaceComparisonOperator": "Eq_NotEq NotEq_Eq Lt_LtE Lt_GtE LtE_Lt LtE_Gt Gt_GtE Gt_LtE GtE_Gt GtE_Lt "
    "Is_IsNot IsNot_Is",
    "ReplaceUnaryOperator": "UAdd_USub USub_UAdd Delete_Not Delete_Invert",
}


@pytest.mark.parametrize("family", sorted(KEPT))
def test_the_filter_keeps_exactly_the_chosen_cosmic_ray_operators(config, family):
    plugins = pytest.importorskip("cosmic_ray.plugins")  # not a test dependency
    names = [name for name in plugins.operator_names() if name.startswith(f"core/{family}_")]
    kept = [name.split("_", 1)[1] for name in names if _kept_by_the_filter(config, name)]
    assert sorted(kept) == sorted(KEPT[family].split())  # a misspelt name in a pattern would be missing
    assert len(names) > len(kept)


def test_modules_are_the_configs_and_split_into_groups_of_about_equal_size(mutation):
    modules = mutation.select_modules(REPO_ROOT)
    assert "rail_interview/stat_tracking/tracker.py" in modules
    assert "rail_interview/stat_tracking/reference.py" not in modules
    assert mutation.select_modules(REPO_ROOT, ["batch.py"]) == ["rail_interview/stat_tracking/batch.py"]
    with pytest.raises(FileNotFoundError, match="no module"):
        mutation.select_modules(REPO_ROOT, ["no_such_module.py"])
    groups = mutation.split_modules(REPO_ROOT, modules, 2)
    assert sorted(sum(groups, [])) == modules and len(groups) == 2
    sizes = [sum((REPO_ROOT / m).stat().st_size for m in group) for group in groups]
    assert abs(sizes[0] - sizes[1]) <= max((REPO_ROOT / m).stat().st_size for m in modules)
    assert mutation.split_modules(REPO_ROOT, modules[:1], 4) == [modules[:1]]


def test_a_workers_config_is_the_committed_one_with_its_modules(mutation, config):
    text = (REPO_ROOT / "benchmarks" / "cosmic-ray.toml").read_text()
    ours = tomllib.loads(mutation.worker_config(text, ["a/b.py", "c.py"]))["cosmic-ray"]
    assert ours == {**config, "module-path": ["a/b.py", "c.py"]}


def test_a_dry_run_copies_the_tree_writes_the_configs_and_prints_the_commands(mutation, capsys, tmp_path):
    assert mutation.main(["--dry-run", "--workers", "2", "--modules", "batch.py", "ema.py", f"--out={tmp_path}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    copies = [pathlib.Path(line.split(":")[0]) for line in printed if not line.startswith(" ")]
    assert len(copies) == 2 and not any(copy.exists() for copy in copies)  # the scratch copies are removed
    session, config = tmp_path / "worker0" / "session.sqlite", tmp_path / "worker0" / "cosmic-ray.toml"
    assert f"  cosmic-ray init {config} {session}" in printed and f"  cosmic-ray exec {config} {session}" in printed
    modules = [tomllib.loads((tmp_path / f"worker{i}" / "cosmic-ray.toml").read_text())["cosmic-ray"] for i in (0, 1)]
    assert sorted(m["module-path"][0] for m in modules) == [
        "rail_interview/stat_tracking/batch.py",
        "rail_interview/stat_tracking/ema.py",
    ]


def test_the_copy_holds_uncommitted_files_and_no_git_directory(mutation, tmp_path):
    mutation.copy_tree(tmp_path)
    assert (tmp_path / "benchmarks" / "cosmic-ray.toml").is_file() and (tmp_path / "tests" / "conftest.py").is_file()
    assert not (tmp_path / ".git").exists() and not (tmp_path / ".venv").exists()


def _dump_line(module, line, operator, worker_outcome, test_outcome, diff=None):
    mutation = {"module_path": module, "operator_name": operator, "occurrence": 0, "start_pos": [line, 4]}
    result = None if worker_outcome is None else {"worker_outcome": worker_outcome, "test_outcome": test_outcome}
    return json.dumps([{"mutations": [mutation]}, result and dict(result, diff=diff)])


def test_the_report_counts_outcomes_and_shows_each_survivor(mutation):
    module = "rail_interview/stat_tracking/batch.py"
    dumps = [
        "\n".join(
            [
                _dump_line(module, 10, "core/NumberReplacer", "normal", "killed"),
                _dump_line(module, 12, "core/AddNot", "normal", "survived", "-    if a:\n+    if not a:\n"),
                _dump_line(module, 14, "core/AddNot", "skipped", None),
            ]
        ),
        "\n".join(
            [
                _dump_line("x.py", 3, "core/ReplaceTrueWithFalse", "abnormal", "incompetent"),
                _dump_line("x.py", 5, "core/AddNot", None, None),
            ]
        ),
    ]
    summary = mutation.summarize(dumps)
    assert summary["counts"] == {"killed": 1, "survived": 1, "filtered": 1, "broken": 1, "pending": 1}
    report = mutation.format_report(summary)
    assert "1 of 2 killed (50.0%); 1 filtered, 1 broken, 1 pending" in report
    assert f"| {module} | 1 of 2 killed (50.0%) |" in report and "| x.py |" not in report
    assert f"### {module}:12 core/AddNot (occurrence 0)\n\n```diff\n-    if a:\n+    if not a:\n```" in report
