"""Where memory pays: the GRPO family with and without per-prompt memory, SPO and prompt selection, on pass/fail.

Usage:
    python scripts/pass_fail_study.py --out=docs/results/pass_fail   # the README's figures, about 17 minutes on 2 cores
    python scripts/pass_fail_study.py --quick                        # a smaller grid, into a temporary directory
    python scripts/pass_fail_study.py --config.num_epochs=150        # any field of configs/pass_fail.py

Every run starts from the training config (rail_interview/configs/pass_fail.py
unless --config names another pass/fail config), so a study row is what
`scripts/train.py --config=rail_interview/configs/pass_fail.py` with that
row's method, memory and group size trains, bit for bit. See
rail_interview/studies/pass_fail.py for the rows and how each row's learning
rate is chosen (on tuning seeds, reported on other seeds).
"""

import os
import sys
import tempfile

from absl import app, flags

from rail_interview import configs, training
from rail_interview.studies import pass_fail as pass_fail_study

_CONFIG = configs.define_config_flag(
    "pass_fail_study.py", "Pass/fail training config every run starts from.", configs.PASS_FAIL_CONFIG_PATH
)
_OUT = flags.DEFINE_string(
    "out", None, "Directory for results.md, results.csv and curves.png (default: a temporary one)."
)
_SEEDS = flags.DEFINE_integer("seeds", 10, "Evaluation seeds 0 .. seeds - 1.", lower_bound=1)
_TUNING_SEEDS = flags.DEFINE_integer(
    "tuning_seeds", 10, "Seeds of the learning-rate sweep: 100 .. 100 + tuning_seeds - 1.", lower_bound=1
)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes.", lower_bound=1)
_QUICK = flags.DEFINE_bool(
    "quick", False, "G = 2 and 8 only, fewer ablations, and of the fragile points only the rare visits."
)


def main(argv):
    """Runs the study and prints where it wrote."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        pass_fail_study.cells(_CONFIG.value, _QUICK.value)  # checks the config before any run
    except training.ConfigError as error:
        sys.exit(f"pass_fail_study.py: error: {' '.join(str(error).split())}")
    out = _OUT.value or tempfile.mkdtemp(prefix="rail_interview_pass_fail_")
    pass_fail_study.run_study(
        _CONFIG.value,
        out,
        seeds=range(_SEEDS.value),
        tuning_seeds=range(100, 100 + _TUNING_SEEDS.value),
        workers=_WORKERS.value,
        quick=_QUICK.value,
    )
    print(f"Wrote {out}/results.md, results.csv and curves.png")


if __name__ == "__main__":
    app.run(main)
