"""Plots the per-prompt stats that a training run logged; see rail_interview/stats_plots.py.

Usage:
    python scripts/plot_stats.py --logdir=logs/20261124-004036_buffer_seed0
    python scripts/plot_stats.py --logdir=RUN_A,RUN_B --out=/tmp/plots    # overlay runs of one problem
    python scripts/plot_stats.py --logdir=RUN --prompts=brave-otter,17   # chosen prompts
    python scripts/plot_stats.py --logdir=MY_STATS_DIR                   # PromptStatsRecorder's directory

Writes prompt_stats.png into --out (default: the first directory): the
batch-mean reward over training on top (from metrics.csv, where there is one),
then one panel per prompt with the tracker's mean, plus and minus one std, and
the prompt's batch rewards. Overlaid runs are matched by prompt name and must
be of one problem (seed and problem config).
"""

import os
import sys

from absl import app, flags

from rail_interview import stats_plots

_LOGDIR = flags.DEFINE_list(
    "logdir", None, "Run directory or PromptStatsRecorder directory, or several separated by commas to overlay them."
)
_OUT = flags.DEFINE_string("out", None, "Directory for the PNG (default: the first --logdir).")
_PROMPTS = flags.DEFINE_list("prompts", [], "Prompt names or ids to draw (default: all recorded, or a sample).")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 64, "Panels to draw at most when --prompts is not given.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sample of prompts when there are more than --max_prompts.")
flags.mark_flag_as_required("logdir")


def main(argv):
    """Loads the runs and writes the plot.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        runs = [stats_plots.load_run(run_dir) for run_dir in _LOGDIR.value]
        stats_plots.check_same_problem(runs)
        columns = stats_plots.choose_prompts(
            runs[0].stats,
            _PROMPTS.value,
            max_prompts=_MAX_PROMPTS.value,
            seed=_SEED.value,
            among=stats_plots.common_prompt_names(runs),
        )
    except (FileNotFoundError, KeyError, stats_plots.RunMismatchError) as error:
        sys.exit(f"error: {error.args[0] if isinstance(error, KeyError) and error.args else error}")
    for note in stats_plots.metrics_notes(runs):
        print(note)
    out = _OUT.value or _LOGDIR.value[0]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "prompt_stats.png")
    stats_plots.plot_prompt_stats(runs, columns, path)
    print(f"Wrote {path} ({len(columns)} prompts, {len(runs)} run(s))")


if __name__ == "__main__":
    app.run(main)
