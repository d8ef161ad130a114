"""The study of where memory pays on the pass/fail problem, behind ``scripts/pass_fail_study.py``.

Every run starts from one training config (``configs/pass_fail.py`` with
any overrides: ``PassFailRun.from_config``), so the study's runs are
``train.py``'s runs on that config, bit for bit. What varies:

* **The grid**: each estimator (GRPO, Dr. GRPO, RLOO) with each memory
  (none, buffer, EMA) at each group size G in ``GROUP_SIZES``, with
  B = N / G prompts per step (N, the config's sample_batch_size, fixed),
  and DAPO's dynamic sampling beside them.
* **The ablations** of ``pass_fail_runs`` (G = 2 and 4, GRPO with a
  buffer) and the oracle baseline.
* **The fragile points**: prompts revisited four times less often (P = 4 x
  the config's), problems whose prompts start at higher pass rates (labels
  nearer the starting answers: ``LABEL_SCALES``), and buffers shorter than
  the group (K < G, which ``training.validate_config`` refuses).
* **Single stream**: SPO (``presets.spo``: one answer per prompt, G = 1,
  a Beta memory's pass rate from before the step as the baseline) at the
  same N samples per step, compared at equal samples with every group
  row (``VERSUS``).
* **Baselines from the past only**: GRPO with each memory read before the
  step (``include_batch=False``).
* **Prompt selection**: each ``PromptSampler`` rule (``SELECTION_RULES``)
  on each memory at G = 4 (B = 16 of P = 64 prompts), paired with the same
  memory drawing uniformly; in-batch GRPO selects by a Beta memory kept
  beside it (selection without the memory's baseline); and SPO at B = 16
  (N = 16 per step, four times the steps: equal samples) with and without
  selection.

For each row the learning rate is chosen from ``LEARNING_RATES`` by median
area under the pass-rate curve (``SCORE``: at equal samples) on *tuning* seeds, then the row is run on
the *evaluation* seeds at that rate, and at the config's learning rate, the
one a user would first try. Tuning and evaluation seeds differ, so the
choice does not flatter the figures reported. Every row is compared seed by
seed with its reference (in-batch GRPO on the same problem and G, at its
own best rate): the same seed draws the same problem instance.

Dimensions: N samples per step, G per prompt, B = N / G prompts.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import ml_collections

from rail_interview import training
from rail_interview.studies.pass_fail_runs import MEMORIES, METHODS, PassFailRun, summarize, train_pass_fail

GROUP_SIZES = (2, 4, 8, 16)
LEARNING_RATES = (2.5, 5.0, 10.0, 20.0, 40.0)
#: The label scales of the rows whose pass rates start higher (the config's, 8, starts them near 0).
LABEL_SCALES = (4.0, 2.0, 1.0)
#: What the learning rate is chosen by and rows are paired on: the area under the pass-rate curve
#: over a run's first num_steps * N samples (``summarize``). It is the area per step for every row
#: but DAPO's, which draws more samples per step and is judged at the same samples as the others.
SCORE = "area_same_samples"
#: The rows whose curves ``curves.png`` draws.
PLOTTED = ("grpo", "grpo+buffer", "grpo+ema", "grpo dynamic sampling (DAPO)", "grpo, oracle baseline")
#: The prompt sampler's rules the selection rows try (uniform is the problem's own draws).
SELECTION_RULES = ("spo", "failure_rate", "greso")
#: The group rows single-stream SPO is compared with, at every G.
VERSUS = ("grpo", "rloo", "grpo+buffer", "grpo+beta", "grpo dynamic sampling (DAPO)")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the study.

    Attributes:
        name: the row's label; with ``group_size``, its key.
        group_size: G.
        run: the settings every seed runs with (seed and learning rate aside).
        reference: the name of the row whose runs this one's are paired with
            for the win counts: in-batch GRPO on the same problem, or the
            same memory drawing prompts uniformly (selection rows).
        block: which table the row belongs to (``"grid"``, ``"ablations"``,
            ``"single stream"``, ``"past only"``, ``"selection"``, ``"rare
            visits"``, ``"higher start"``, ``"short buffers"``).
        reference_size: the reference's G, if not ``group_size``.
    """

    name: str
    group_size: int
    run: PassFailRun
    reference: str = "grpo"
    block: str = "grid"
    reference_size: Optional[int] = None

    @property
    def reference_key(self) -> Tuple[str, int]:
        """The reference row's (name, G)."""
        return self.reference, self.group_size if self.reference_size is None else self.reference_size


def _method_name(method: str, memory: str) -> str:
    return method if memory == "none" else f"{method}+{memory}"


def cells(config: ml_collections.ConfigDict, quick: bool = False) -> List[Cell]:
    """The study's rows, built from a pass/fail training config.

    Args:
        config: ``configs/pass_fail.py``'s config, with any overrides: the
            problem, N, the number of steps, K, the EMA decay and min_count.
        quick: G = 2 and 8 only, one ablation size, and no fragile-point rows
            but the rare visits.

    Returns:
        The cells.

    Raises:
        training.ConfigError: if the config is not a valid pass/fail config,
            or N is not a multiple of every G of the grid with at most P groups.
    """
    base = PassFailRun.from_config(config, memory="none", method="grpo")
    batch = base.num_groups * base.group_size

    def at(size: int, **changes: Any) -> PassFailRun:
        """The base run at group size ``size`` (B = N / size), with ``changes``."""
        return dataclasses.replace(base, group_size=size, num_groups=batch // size, **changes)

    sizes = (2, 8) if quick else GROUP_SIZES
    if any(batch % size or batch // size > base.num_prompts for size in sizes):
        raise training.ConfigError(
            f"config.sample_batch_size ({batch}) must be a multiple of every group size of the study "
            f"({', '.join(map(str, sizes))}) with at most config.problem.num_prompts ({base.num_prompts}) groups"
        )
    rows = []
    for size in sizes:
        for method in METHODS:
            for memory in MEMORIES:
                rows.append(Cell(_method_name(method, memory), size, at(size, method=method, memory=memory)))
        rows.append(Cell("grpo dynamic sampling (DAPO)", size, at(size, dynamic_sampling=True)))
    for size in (2,) if quick else (2, 4):
        for ablation in ("zero_variance_only", "group_mean_memory_std"):
            rows.append(
                Cell(
                    f"grpo+buffer, ablation {ablation}",
                    size,
                    at(size, memory="buffer", ablation=ablation),
                    "grpo",
                    "ablations",
                )
            )
        rows.append(Cell("grpo, oracle baseline", size, at(size, ablation="oracle"), "grpo", "ablations"))
    rows += _stream_past_and_selection_cells(at, quick)
    rare = 4 * base.num_prompts
    for memory in MEMORIES:
        name = f"{_method_name('grpo', memory)}, P = {rare}"
        rows.append(Cell(name, 4, at(4, memory=memory, num_prompts=rare), f"grpo, P = {rare}", "rare visits"))
    oracle = at(4, ablation="oracle", num_prompts=rare)
    rows.append(Cell(f"grpo, oracle baseline, P = {rare}", 4, oracle, f"grpo, P = {rare}", "rare visits"))
    # Single stream and selection where a step sees a quarter of the prompts (B = 64 of 256 at G = 1).
    stream = at(1, method="spo", num_prompts=rare)
    rows.append(Cell(f"spo, P = {rare}", 1, stream, f"grpo, P = {rare}", "rare visits", reference_size=4))
    selected = dataclasses.replace(stream, sampler="spo")
    rows.append(Cell(f"spo, P = {rare}, sampler spo", 1, selected, f"spo, P = {rare}", "rare visits"))
    buffered = at(4, memory="buffer", num_prompts=rare, sampler="spo")
    name = f"grpo+buffer, P = {rare}"
    rows.append(Cell(f"{name}, sampler spo", 4, buffered, name, "rare visits"))
    if quick:
        return rows
    for scale in LABEL_SCALES:
        for size in (2, 4):
            for memory in MEMORIES:
                name = f"{_method_name('grpo', memory)}, label_scale {scale:g}"
                run = at(size, memory=memory, label_scale=scale)
                rows.append(Cell(name, size, run, f"grpo, label_scale {scale:g}", "higher start"))
    for size in (4, 8, 16):
        short = size // 2
        run = at(size, memory="buffer", buffer_size=short, min_count=min(base.min_count, short))
        rows.append(Cell(f"grpo+buffer K={short}", size, run, "grpo", "short buffers"))
    return rows


def _stream_past_and_selection_cells(at, quick: bool) -> List[Cell]:
    """The rows of R3's questions: single-stream SPO, baselines from the past only, and prompt selection.

    Args:
        at: ``size, **changes -> PassFailRun``, the base run at group size
            ``size`` (B = N / size).
        quick: fewer rows.

    Returns:
        The cells.
    """
    size_of_selection = 2 if quick else 4  # a G of the grid: the references' rows
    rows = [Cell("spo", 1, at(1, method="spo"), "grpo", "single stream", reference_size=size_of_selection)]
    for size in (2,) if quick else (2, 4):
        for memory in MEMORIES[1:]:
            name = f"{_method_name('grpo', memory)}, past only"
            rows.append(Cell(name, size, at(size, memory=memory, include_batch=False), "grpo", "past only"))
    # SPO drawing a quarter of the prompts (B = 16 of 64): N / 4 samples per step, four times the steps.
    quarter = at(1, method="spo")
    quarter = dataclasses.replace(quarter, num_groups=quarter.num_groups // 4, num_steps=quarter.num_steps * 4)
    rows.append(Cell("spo, B = 16", 1, quarter, "grpo", "selection", reference_size=size_of_selection))
    for rule in SELECTION_RULES[:1] if quick else SELECTION_RULES:
        if rule != "greso":  # every visit of a prompt at G = 1 has one reward: always zero-variance
            run = dataclasses.replace(quarter, sampler=rule)
            rows.append(Cell(f"spo, B = 16, sampler {rule}", 1, run, "spo, B = 16", "selection"))
        for memory in MEMORIES:
            name = _method_name("grpo", memory)
            selection = "beta" if memory == "none" else "none"
            label = f"{name}, sampler {rule}" + (" (Beta memory for selection only)" if memory == "none" else "")
            run = at(size_of_selection, memory=memory, sampler=rule, selection_memory=selection)
            rows.append(Cell(label, size_of_selection, run, name, "selection"))
    return rows


def _run(job: Tuple[Cell, float, int]) -> Tuple[str, int, float, int, Dict[str, Any]]:
    """One run of a cell at a learning rate and seed; in a worker process."""
    cell, learning_rate, seed = job
    result = train_pass_fail(dataclasses.replace(cell.run, learning_rate=learning_rate, seed=seed))
    return cell.name, cell.group_size, learning_rate, seed, result


def _map(jobs: Sequence[Tuple[Cell, float, int]], workers: int) -> List[Tuple[str, int, float, int, Dict[str, Any]]]:
    """Runs the jobs, in ``workers`` processes when more than one."""
    if workers <= 1:
        return [_run(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs, chunksize=16))


def run_study(
    config: ml_collections.ConfigDict,
    out: str,
    *,
    seeds: Iterable[int],
    tuning_seeds: Iterable[int],
    workers: int = 1,
    quick: bool = False,
    learning_rates: Optional[Sequence[float]] = None,
) -> Dict[str, Any]:
    """Runs the study and writes results.md, results.csv and curves.png into ``out``.

    Args:
        config: the pass/fail training config every run starts from; its
            learning_rate is the shared one.
        out: the output directory, created if missing.
        seeds: evaluation seeds (reported).
        tuning_seeds: seeds of the learning-rate sweep (not reported as results).
        workers: processes.
        quick: a smaller grid (see ``cells``).
        learning_rates: the sweep; ``LEARNING_RATES`` by default.

    Returns:
        ``rows`` (one dict per cell and rate, as in results.csv) and
        ``curves`` (median pass-rate curve, as a fraction of the ceiling,
        per (cell, G) at its chosen rate).
    """
    seeds, tuning_seeds, all_cells = list(seeds), list(tuning_seeds), cells(config, quick)
    rates, shared = tuple(learning_rates or LEARNING_RATES), float(config.learning_rate)
    sweep_jobs = [(cell, rate, seed) for cell in all_cells for rate in rates for seed in tuning_seeds]
    sweep: Dict[Tuple[str, int, float], List[float]] = {}
    for name, size, rate, _, result in _map(sweep_jobs, workers):
        sweep.setdefault((name, size, rate), []).append(summarize(result)[SCORE])
    best = {
        (c.name, c.group_size): max(rates, key=lambda r, c=c: statistics.median(sweep[(c.name, c.group_size, r)]))
        for c in all_cells
    }
    jobs = [(c, rate, s) for c in all_cells for rate in {best[(c.name, c.group_size)], shared} for s in seeds]
    metrics: Dict[Tuple[str, int, float], Dict[int, Dict[str, float]]] = {}
    curves_by_seed: Dict[Tuple[str, int, float], Dict[int, List[float]]] = {}
    for name, size, rate, seed, result in _map(jobs, workers):
        metrics.setdefault((name, size, rate), {})[seed] = summarize(result)
        curves_by_seed.setdefault((name, size, rate), {})[seed] = [p / result["ceiling"] for p in result["pass_rate"]]
    rows = []
    for cell in all_cells:
        key = (cell.name, cell.group_size)
        for label, rate in (("best", best[key]), ("shared", shared)):
            mine = metrics[(cell.name, cell.group_size, rate)]
            reference_rate = best[cell.reference_key] if label == "best" else shared
            theirs = metrics[(*cell.reference_key, reference_rate)]
            wins = sum(mine[s][SCORE] > theirs[s][SCORE] for s in seeds)
            row = {"cell": cell.name, "block": cell.block, "G": cell.group_size, "rate": label, "learning_rate": rate}
            for metric in _MEDIANS:
                row[metric] = statistics.median(mine[s][metric] for s in seeds)
            row["area_gain"] = statistics.median(mine[s][SCORE] - theirs[s][SCORE] for s in seeds)
            is_reference = cell.reference_key == (cell.name, cell.group_size)
            row["wins_vs_reference"] = "" if is_reference else f"{wins}/{len(seeds)}"
            row["reference"] = (
                cell.reference if cell.reference_size is None else f"{cell.reference} (G = {cell.reference_size})"
            )
            row["sweep"] = {r: statistics.median(sweep[(cell.name, cell.group_size, r)]) for r in rates}
            rows.append(row)
    curves = {}
    for cell in all_cells:
        by_seed = curves_by_seed[(cell.name, cell.group_size, best[(cell.name, cell.group_size)])]
        curves[(cell.name, cell.group_size)] = [
            statistics.median(by_seed[s][step] for s in seeds) for step in range(cell.run.num_steps + 1)
        ]
    versus = _versus(all_cells, metrics, best, seeds)
    os.makedirs(out, exist_ok=True)
    _write(out, rows, curves, seeds, tuning_seeds, rates, shared, versus)
    return {"rows": rows, "curves": curves, "versus": versus}


def _versus(
    all_cells: List[Cell],
    metrics: Dict[Tuple[str, int, float], Dict[int, Dict[str, float]]],
    best: Dict[Tuple[str, int], float],
    seeds: List[int],
) -> List[Dict[str, Any]]:
    """Single-stream SPO against group rows of the same problem, each at its best rate, seed by seed.

    SPO's row of the single-stream block meets each grid row of ``VERSUS``
    at every G; SPO's row of the rare visits (P = 4 x) meets that block's
    group rows without a sampler or ablation.

    Returns:
        One dict per (SPO row, group row): the group row's G and median
        area at equal samples, and SPO's median paired gain and wins.
    """

    def peers(stream: Cell) -> List[Cell]:
        """The group rows ``stream`` is compared with."""
        if stream.block == "single stream":
            return [c for c in all_cells if c.block == "grid" and c.name in VERSUS]
        return [
            c
            for c in all_cells
            if c.block == stream.block and c.group_size > 1 and c.run.sampler == "none" and c.run.ablation == "none"
        ]

    comparisons = []
    streams = [
        c
        for c in all_cells
        if c.run.method == "spo" and c.run.sampler == "none" and c.block in ("single stream", "rare visits")
    ]
    for stream in streams:
        mine = metrics[(stream.name, stream.group_size, best[(stream.name, stream.group_size)])]
        for other in peers(stream):
            theirs = metrics[(other.name, other.group_size, best[(other.name, other.group_size)])]
            comparisons.append(
                {
                    "stream": stream.name,
                    "cell": other.name,
                    "G": other.group_size,
                    "area_same_samples": statistics.median(theirs[s][SCORE] for s in seeds),
                    "stream_gain": statistics.median(mine[s][SCORE] - theirs[s][SCORE] for s in seeds),
                    "stream_wins": f"{sum(mine[s][SCORE] > theirs[s][SCORE] for s in seeds)}/{len(seeds)}",
                }
            )
    return comparisons


#: The metrics of ``summarize`` a row reports, each as its median over the evaluation seeds.
_MEDIANS = ("start", "area", "area_same_samples", "final", "steps_to_threshold", "zero_variance", "samples")

#: The columns of results.csv before the sweep's, each a key of a row.
_COLUMNS = ("block", "cell", "G", "rate", "learning_rate", *_MEDIANS, "reference", "area_gain", "wins_vs_reference")

#: The tables of results.md: the block and its title.
_BLOCKS = (
    ("grid", "Every estimator and memory, by group size"),
    ("ablations", "Ablations: which part of the memory helps"),
    ("single stream", "Single stream: SPO, one answer per prompt (G = 1), N samples per step"),
    ("past only", "Baselines from the past only: each memory read before the step (include_batch=False)"),
    ("selection", "Prompt selection by the memory (G = 4: B = 16 of 64; SPO: B = 16, four times the steps)"),
    ("rare visits", "Prompts revisited four times less often"),
    ("higher start", "Pass rates that start higher: labels nearer the starting answers (label_scale 8 above)"),
    ("short buffers", "Buffers shorter than the group (K < G)"),
)


def _write(
    out: str,
    rows: List[Dict[str, Any]],
    curves,
    seeds: List[int],
    tuning_seeds: List[int],
    rates: Sequence[float],
    shared: float,
    versus: Sequence[Dict[str, Any]] = (),
) -> None:
    """Writes results.csv, results.md and curves.png."""
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(_COLUMNS) + [f"sweep_{r:g}" for r in rates])
        for row in rows:
            writer.writerow([row[name] for name in _COLUMNS] + [row["sweep"][r] for r in rates])
    lines = [
        f"Medians over {len(seeds)} evaluation seeds ({seeds[0]} to {seeds[-1]}); learning rates chosen on "
        f"{len(tuning_seeds)} other seeds ({tuning_seeds[0]} to {tuning_seeds[-1]}). start: the pass rate before the "
        "first step, as a fraction of the ceiling; area: the mean pass rate over "
        "the steps, as a fraction of the ceiling; same samples: the same over the samples a run without dynamic "
        "sampling draws (what the learning rate is chosen by and wins count; it differs from area only for DAPO); "
        "final: the last step's; steps to 75%: of the ceiling; gain: the median of the seed-paired "
        "differences in that area with the reference (in-batch GRPO on the same problem and G, at its own best "
        "rate, or at the shared rate in the shared tables); wins: seeds where that area beats the reference's.",
        "",
    ]
    header = (
        "| G | setting | lr | start | area | same samples | final | steps to 75% | zero-variance groups | samples | "
        "gain | wins |"
    )
    for label, title in (
        ("best", "each at its own best learning rate"),
        ("shared", f"all at learning rate {shared:g}"),
    ):
        lines += [f"## {title[0].upper()}{title[1:]}", ""]
        for block, block_title in _BLOCKS:
            selected = [r for r in rows if r["rate"] == label and r["block"] == block]
            if not selected:
                continue
            lines += [f"### {block_title}", "", header, "| ---: | --- |" + " ---: |" * 10]
            for row in selected:
                lines.append(
                    f"| {row['G']} | {row['cell']} | {row['learning_rate']:g} | {row['start']:.3f} | "
                    f"{row['area']:.3f} | {row['area_same_samples']:.3f} | {row['final']:.3f} | "
                    f"{row['steps_to_threshold']:g} | {row['zero_variance']:.2f} | {row['samples']:,.0f} | "
                    + (
                        f"{row['area_gain']:+.3f} | {row['wins_vs_reference']} |"
                        if row["wins_vs_reference"]
                        else " | |"
                    )
                )
            lines.append("")
    if versus:
        lines += [
            "## Single stream against groups, at equal samples (each at its own best learning rate)",
            "",
            "| single stream | group row | G | group row's area | single stream's gain | wins |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in versus:
            lines.append(
                f"| {row['stream']} | {row['cell']} | {row['G']} | {row['area_same_samples']:.3f} | "
                f"{row['stream_gain']:+.3f} | {row['stream_wins']} |"
            )
        lines.append("")
    lines += [
        "## Learning-rate sweep (median area at equal samples on the tuning seeds)",
        "",
        "| G | setting | " + " | ".join(f"lr {r:g}" for r in rates) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in rates) + " |",
    ]
    for row in (r for r in rows if r["rate"] == "best"):
        lines.append(f"| {row['G']} | {row['cell']} | " + " | ".join(f"{row['sweep'][r]:.3f}" for r in rates) + " |")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(os.path.join(out, "curves.png"), curves)


def _plot(path: str, curves: Dict[Tuple[str, int], List[float]]) -> None:
    """curves.png: a panel per G of the grid, then the rare visits and a higher start at G = 2; one colour per row."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    panels = [(f"G = {size}", size, "") for size in sorted({size for name, size in curves if name == "grpo"})]
    panels += [
        (f"G = 4, {suffix}", 4, f", {suffix}")
        for suffix in sorted({name.split(", ")[-1] for name, _ in curves if name.startswith("grpo, P = ")})
    ]
    panels += [
        (f"G = 2, label_scale {scale:g}", 2, f", label_scale {scale:g}")
        for scale in LABEL_SCALES[:1]
        if (f"grpo, label_scale {scale:g}", 2) in curves
    ]
    figure, axes = plt.subplots(
        2, -(-len(panels) // 2), figsize=(4.2 * -(-len(panels) // 2), 7.2), sharey=True, squeeze=False
    )
    for axis, (title, size, suffix) in zip(axes.flat, panels):
        for color, name in enumerate(PLOTTED):
            if (name + suffix, size) in curves:
                label = f"{name}, per step (more samples)" if "DAPO" in name else name
                axis.plot(curves[(name + suffix, size)], label=label, color=f"C{color}", linewidth=1.2)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for row in axes:
        row[0].set_ylabel("pass rate / ceiling (median)")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
