"""Where memory pays: GRPO-family estimators with and without per-prompt memory on the pass/fail problem.

Usage:
    python scripts/pass_fail_study.py --out=docs/results/pass_fail   # the README's figures, a few minutes
    python scripts/pass_fail_study.py --quick                        # a smaller grid, into a temporary directory

See rail_interview/pass_fail_study.py for what is run and how the learning
rate of each cell is chosen (on tuning seeds, reported on other seeds).
"""

import os
import tempfile

from absl import app, flags

from rail_interview import pass_fail_study

_OUT = flags.DEFINE_string(
    "out", None, "Directory for results.md, results.csv and curves.png (default: a temporary one)."
)
_SEEDS = flags.DEFINE_integer("seeds", 10, "Evaluation seeds 0 .. seeds - 1.", lower_bound=1)
_TUNING_SEEDS = flags.DEFINE_integer("tuning_seeds", 5, "Seeds of the learning-rate sweep (100 ...).", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes.", lower_bound=1)
_QUICK = flags.DEFINE_bool("quick", False, "G = 2 and 8 only, and fewer ablations.")


def main(argv):
    """Runs the study and prints where it wrote."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    out = _OUT.value or tempfile.mkdtemp(prefix="rail_interview_pass_fail_")
    pass_fail_study.run_study(
        out,
        seeds=range(_SEEDS.value),
        tuning_seeds=range(100, 100 + _TUNING_SEEDS.value),
        workers=_WORKERS.value,
        quick=_QUICK.value,
    )
    print(f"Wrote {out}/results.md, results.csv and curves.png")


if __name__ == "__main__":
    app.run(main)
