"""The study of where memory pays on the pass/fail problem, behind ``scripts/pass_fail_study.py``.

For each estimator (GRPO, Dr. GRPO, RLOO), memory (none, buffer, EMA) and
group size G (with B = N / G prompts per step, N fixed), the learning rate
is chosen from a sweep on *tuning* seeds (by median area under the
pass-rate curve), then the cell is run on the *evaluation* seeds at that
rate, and at one shared rate, the one a user would first try. Tuning and
evaluation seeds differ, so the choice of rate does not flatter the
figures reported. Every cell is compared seed by seed with in-batch GRPO
(memory none) at its own best rate: the same seed draws the same problem.

Beside the grid: DAPO's dynamic sampling, the ablations of
``pass_fail_training`` (G = 2 and 4, GRPO with a buffer), and a setting
where prompts are revisited four times less often (P = 4 x the default).

Dimensions: N samples per step, G per prompt, B = N / G prompts.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import statistics
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from rail_interview.pass_fail_training import PassFailRun, summarize, train_pass_fail

#: Samples per step; B = SAMPLES_PER_STEP // G.
SAMPLES_PER_STEP = 64
GROUP_SIZES = (2, 4, 8, 16)
LEARNING_RATES = (2.5, 5.0, 10.0, 20.0, 40.0)
SHARED_LEARNING_RATE = 5.0
METHODS = ("grpo", "dr_grpo", "rloo")
MEMORIES = ("none", "buffer", "ema")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the study: a name and the settings every seed runs with (seed and learning rate aside)."""

    name: str
    group_size: int
    run: PassFailRun


def cells(quick: bool = False, num_steps: int = 300) -> List[Cell]:
    """The study's rows: the grid, DAPO, the ablations and the rarely revisited prompts.

    Args:
        quick: G = 2 and 8 only, and GRPO's ablations at G = 2 only.
        num_steps: policy updates per run.

    Returns:
        The cells.
    """
    sizes = (2, 8) if quick else GROUP_SIZES
    rows = []
    for size in sizes:
        base = PassFailRun(group_size=size, num_groups=SAMPLES_PER_STEP // size, num_steps=num_steps)
        for method in METHODS:
            for memory in MEMORIES:
                name = method if memory == "none" else f"{method}+{memory}"
                rows.append(Cell(name, size, dataclasses.replace(base, method=method, memory=memory)))
        rows.append(Cell("grpo dynamic sampling (DAPO)", size, dataclasses.replace(base, dynamic_sampling=True)))
    for size in (2,) if quick else (2, 4):
        base = PassFailRun(group_size=size, num_groups=SAMPLES_PER_STEP // size, memory="buffer", num_steps=num_steps)
        for ablation in ("zero_variance_only", "group_mean_memory_std"):
            rows.append(Cell(f"grpo+buffer, ablation {ablation}", size, dataclasses.replace(base, ablation=ablation)))
        rows.append(Cell("grpo, oracle baseline", size, dataclasses.replace(base, memory="none", ablation="oracle")))
    # Prompts revisited four times less often: P = 256 instead of 64, at G = 4.
    rare = PassFailRun(group_size=4, num_groups=SAMPLES_PER_STEP // 4, num_prompts=256, num_steps=num_steps)
    for memory in MEMORIES:
        name = "grpo" if memory == "none" else f"grpo+{memory}"
        rows.append(Cell(f"{name}, P = 256", 4, dataclasses.replace(rare, memory=memory)))
    return rows


def _run(job: Tuple[Cell, float, int]) -> Tuple[str, int, float, int, Dict[str, Any]]:
    cell, learning_rate, seed = job
    result = train_pass_fail(dataclasses.replace(cell.run, learning_rate=learning_rate, seed=seed))
    return cell.name, cell.group_size, learning_rate, seed, result


def _map(jobs: Sequence[Tuple[Cell, float, int]], workers: int) -> List[Tuple[str, int, float, int, Dict[str, Any]]]:
    if workers <= 1:
        return [_run(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs, chunksize=16))


def run_study(
    out: str,
    *,
    seeds: Iterable[int],
    tuning_seeds: Iterable[int],
    workers: int = 1,
    quick: bool = False,
    num_steps: int = 300,
) -> Dict[str, Any]:
    """Runs the study and writes results.md, results.csv and curves.png into ``out``.

    Args:
        out: the output directory, created if missing.
        seeds: evaluation seeds (reported).
        tuning_seeds: seeds of the learning-rate sweep (not reported as results).
        workers: processes.
        quick: a smaller grid (see ``cells``).
        num_steps: policy updates per run.

    Returns:
        ``rows`` (one dict per cell, as in results.csv) and ``curves``
        (median pass-rate curve per (cell, G) at its chosen rate).
    """
    seeds, tuning_seeds, all_cells = list(seeds), list(tuning_seeds), cells(quick, num_steps)
    sweep_jobs = [(cell, rate, seed) for cell in all_cells for rate in LEARNING_RATES for seed in tuning_seeds]
    sweep: Dict[Tuple[str, int, float], List[float]] = {}
    for name, size, rate, _, result in _map(sweep_jobs, workers):
        sweep.setdefault((name, size, rate), []).append(summarize(result)["area"])
    best = {
        (c.name, c.group_size): max(
            LEARNING_RATES, key=lambda r, c=c: statistics.median(sweep[(c.name, c.group_size, r)])
        )
        for c in all_cells
    }
    jobs = [(c, best[(c.name, c.group_size)], s) for c in all_cells for s in seeds]
    jobs += [(c, SHARED_LEARNING_RATE, s) for c in all_cells for s in seeds]
    runs: Dict[Tuple[str, int, float], Dict[int, Dict[str, Any]]] = {}
    for name, size, rate, seed, result in _map(jobs, workers):
        runs.setdefault((name, size, rate), {})[seed] = result
    rows = []
    for cell in all_cells:
        key = (cell.name, cell.group_size)
        reference = "grpo, P = 256" if cell.run.num_prompts != 64 else "grpo"
        for label, rate in (("best", best[key]), ("shared", SHARED_LEARNING_RATE)):
            results = runs[(cell.name, cell.group_size, rate)]
            base_rate = best[(reference, cell.group_size)] if label == "best" else SHARED_LEARNING_RATE
            base = runs[(reference, cell.group_size, base_rate)]
            metrics = [summarize(results[s]) for s in seeds]
            wins = sum(m["area"] > summarize(base[s])["area"] for m, s in zip(metrics, seeds))
            rows.append(
                {
                    "cell": cell.name,
                    "G": cell.group_size,
                    "rate": label,
                    "learning_rate": rate,
                    "area": statistics.median(m["area"] for m in metrics),
                    "final": statistics.median(m["final"] for m in metrics),
                    "steps_to_75": statistics.median(m["steps_to_threshold"] for m in metrics),
                    "zero_variance": statistics.median(m["zero_variance"] for m in metrics),
                    "samples": statistics.median(m["samples"] for m in metrics),
                    "wins_vs_grpo": f"{wins}/{len(seeds)}" if cell.name != reference else "",
                    "sweep": {r: statistics.median(sweep[(cell.name, cell.group_size, r)]) for r in LEARNING_RATES},
                }
            )
    curves = {}
    for cell in all_cells:
        results = runs[(cell.name, cell.group_size, best[(cell.name, cell.group_size)])]
        curves[(cell.name, cell.group_size)] = [
            statistics.median(results[s]["pass_rate"][step] / results[s]["ceiling"] for s in seeds)
            for step in range(cell.run.num_steps + 1)
        ]
    os.makedirs(out, exist_ok=True)
    _write(out, rows, curves, seeds)
    return {"rows": rows, "curves": curves}


#: The columns of results.csv before the sweep's, each a key of a row.
_COLUMNS = (
    "cell",
    "G",
    "rate",
    "learning_rate",
    "area",
    "final",
    "steps_to_75",
    "zero_variance",
    "samples",
    "wins_vs_grpo",
)


def _write(out: str, rows: List[Dict[str, Any]], curves, seeds: List[int]) -> None:
    """results.csv, results.md and curves.png."""
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(_COLUMNS) + [f"sweep_{r}" for r in LEARNING_RATES])
        for row in rows:
            writer.writerow([row[name] for name in _COLUMNS] + [row["sweep"][r] for r in LEARNING_RATES])
    lines = [
        f"Medians over {len(seeds)} seeds. area: mean pass rate over the steps, as a fraction of the ceiling; "
        "final: the last step's; steps to 75%: of the ceiling; wins: seeds where the area beats in-batch GRPO's "
        "(at its own best rate), same seed, same problem.",
        "",
    ]
    for label, title in (("best", "Each at its own best learning rate"), ("shared", "All at learning rate 5")):
        lines += [
            f"### {title}",
            "",
            "| G | setting | lr | area | final | steps to 75% | zero-variance groups | samples | wins vs GRPO |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in (r for r in rows if r["rate"] == label):
            lines.append(
                f"| {row['G']} | {row['cell']} | {row['learning_rate']:g} | {row['area']:.3f} | "
                f"{row['final']:.3f} | {row['steps_to_75']:g} | {row['zero_variance']:.2f} | "
                f"{row['samples']:,.0f} | {row['wins_vs_grpo']} |"
            )
        lines.append("")
    lines += [
        "### Learning-rate sweep (median area on the tuning seeds)",
        "",
        "| G | setting | " + " | ".join(f"lr {r:g}" for r in LEARNING_RATES) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in LEARNING_RATES) + " |",
    ]
    for row in (r for r in rows if r["rate"] == "best"):
        lines.append(
            f"| {row['G']} | {row['cell']} | " + " | ".join(f"{row['sweep'][r]:.3f}" for r in LEARNING_RATES) + " |"
        )
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    sizes = sorted({size for _, size in curves})
    figure, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), sharey=True, squeeze=False)
    shown = ("grpo", "grpo+buffer", "grpo+ema", "grpo dynamic sampling (DAPO)", "grpo, oracle baseline")
    for axis, size in zip(axes[0], sizes):
        for name in shown:
            if (name, size) in curves:
                axis.plot(curves[(name, size)], label=name, linewidth=1.2)
        axis.set_title(f"G = {size}, B = {SAMPLES_PER_STEP // size}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass rate / ceiling (median)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(figure)
