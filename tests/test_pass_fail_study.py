"""The pass/fail study: its rows, the learning-rate choice on tuning seeds, and the files it writes."""

import csv
import os
import subprocess
import sys

from rail_interview import pass_fail_study

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_grid_has_every_estimator_memory_and_group_size():
    names = {(c.name, c.group_size) for c in pass_fail_study.cells()}
    for size in pass_fail_study.GROUP_SIZES:
        for method in pass_fail_study.METHODS:
            for memory in pass_fail_study.MEMORIES:
                assert ((method if memory == "none" else f"{method}+{memory}"), size) in names
        assert ("grpo dynamic sampling (DAPO)", size) in names
    assert ("grpo, oracle baseline", 2) in names and ("grpo+buffer, P = 256", 4) in names
    assert all(c.run.num_groups * c.group_size == pass_fail_study.SAMPLES_PER_STEP for c in pass_fail_study.cells())


def test_a_small_study_writes_its_tables_and_plot(tmp_path):
    result = pass_fail_study.run_study(str(tmp_path), seeds=[0, 1], tuning_seeds=[100], quick=True, num_steps=15)
    assert {"results.md", "results.csv", "curves.png"} <= set(os.listdir(tmp_path))
    rows = result["rows"]
    assert len(rows) == 2 * len(pass_fail_study.cells(quick=True))
    best = [r for r in rows if r["rate"] == "best"]
    for row in best:
        assert row["learning_rate"] == max(row["sweep"], key=row["sweep"].get)  # chosen on the tuning seeds
        assert row["wins_vs_grpo"] == "" or row["wins_vs_grpo"].endswith("/2")
    assert all(r["learning_rate"] == pass_fail_study.SHARED_LEARNING_RATE for r in rows if r["rate"] == "shared")
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "### Learning-rate sweep" in (tmp_path / "results.md").read_text(encoding="utf-8")


def test_pass_fail_study_script_refuses_bad_flags_in_one_line():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "pass_fail_study.py"), "--seeds=0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--seeds" in result.stderr
