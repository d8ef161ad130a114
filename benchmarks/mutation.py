"""Mutation testing of rail_interview/stat_tracking: cosmic-ray's own CLI, run in scratch copies.

cosmic-ray does the work, as ``benchmarks/cosmic-ray.toml`` configures it
(the modules, the tests run per mutant, the timeout, the operators left out
and why). It writes each mutant into the file under test, so this script
adds only what its CLI cannot do: it copies the working tree (tracked and
untracked, not ignored, files) into scratch directories and runs there, so
the checkout is never modified; it splits the modules over ``--workers``
copies, one session each (the local distributor tests one mutant at a time);
and it prints the killed share, killed / (killed + survived), overall and per
module, and every survivor with its diff, also in ``<out>/report.md``.

Usage:
    pip install cosmic-ray                                # not in the test extra
    python benchmarks/mutation.py                         # all but reference.py, 2 workers
    python benchmarks/mutation.py --modules batch.py --workers 1   # one module
    python benchmarks/mutation.py --dry-run               # the copies and commands only
"""

import argparse
import collections
import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence

try:
    import tomllib
except ImportError:  # Python < 3.11: the toml package cosmic-ray depends on
    import toml as tomllib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = pathlib.Path("benchmarks/cosmic-ray.toml")


class Worker(NamedTuple):
    """A copy of the tree; a folder with its config (the committed one, for its modules), session and log."""

    tree: pathlib.Path
    out: pathlib.Path
    modules: List[str]


def select_modules(tree: pathlib.Path, names: Optional[Sequence[str]] = None) -> List[str]:
    """The modules to mutate, relative to ``tree``: ``names`` under the config's module-path, or the config's.

    Raises:
        FileNotFoundError: a named module does not exist.
    """
    config = tomllib.loads((tree / CONFIG).read_text())["cosmic-ray"]
    package = tree / config["module-path"]
    excluded = {path for pattern in config["excluded-modules"] for path in tree.glob(pattern)}
    paths = [package / name for name in names] if names else set(package.rglob("*.py")) - excluded
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no module {path}")
    return sorted(path.relative_to(tree).as_posix() for path in paths)


def split_modules(tree: pathlib.Path, modules: Sequence[str], workers: int) -> List[List[str]]:
    """Deals the modules, largest first, into at most ``workers`` groups of about equal size."""
    by_size = sorted(modules, key=lambda module: -(tree / module).stat().st_size)
    return [sorted(by_size[i :: min(workers, len(modules))]) for i in range(min(workers, len(modules)))]


def worker_config(text: str, modules: Sequence[str]) -> str:
    """The config's text with its ``module-path`` set to ``modules`` (a JSON list of strings is TOML)."""
    return re.sub(r"(?m)^module-path = .*$", lambda _: f"module-path = {json.dumps(list(modules))}", text, count=1)


def commands(worker: Worker) -> List[List[str]]:
    """cosmic-ray's commands for one worker's session, in order: make it, filter it, run it."""
    config, session = str(worker.out / "cosmic-ray.toml"), str(worker.out / "session.sqlite")
    return [
        ["cosmic-ray", "init", config, session],
        ["cr-filter-operators", session, config],
        ["cr-filter-pragma", session],
        ["cosmic-ray", "exec", config, session],
    ]


def copy_tree(destination: pathlib.Path) -> None:
    """Copies the working tree's tracked and untracked, not ignored, files into ``destination``."""
    listing = subprocess.check_output(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT
    )
    for name in filter(None, listing.decode().split("\0")):
        if (REPO_ROOT / name).is_file():  # a tracked file deleted in the working tree is not copied
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)


def summarize(dumps: Sequence[str]) -> Dict:
    """Counts and survivors from ``cosmic-ray dump``'s output of every session (one JSON line per mutant).

    Returns:
        ``counts`` (killed, survived, filtered, broken, pending), ``per_module`` and ``survivors``.
    """
    counts = collections.Counter(killed=0, survived=0)
    per_module: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for item, result in (json.loads(line) for line in "\n".join(dumps).splitlines()):
        mutation = item["mutations"][0]
        if result is None:
            counts["pending"] += 1
        elif result["worker_outcome"] in ("skipped", "no-test"):
            counts["filtered"] += 1  # by operator or by # pragma: no mutate
        elif result["worker_outcome"] != "normal" or result["test_outcome"] == "incompetent":
            counts["broken"] += 1  # the machinery failed, not the tests
        else:
            counts[result["test_outcome"]] += 1
            per_module[mutation["module_path"]][result["test_outcome"]] += 1
            if result["test_outcome"] == "survived":
                where = {"module": mutation["module_path"], "line": mutation["start_pos"][0]}
                keys = ("operator_name", "occurrence")
                survivors.append({**where, **{k: mutation[k] for k in keys}, "diff": result["diff"] or ""})
    survivors.sort(key=lambda s: (s["module"], s["line"], s["operator_name"]))
    return {"counts": dict(counts), "per_module": dict(sorted(per_module.items())), "survivors": survivors}


def format_report(summary: Dict) -> str:
    """The Markdown report: the killed share overall and per module, then every survivor and its diff."""

    def share(c) -> str:
        """A count's killed share, in words."""
        ran = c["killed"] + c["survived"]
        return f"{c['killed']} of {ran} killed ({100 * c['killed'] / ran:.1f}%)" if ran else "none ran"

    counts = summary["counts"]
    others = ", ".join(f"{counts[k]} {k}" for k in ("filtered", "broken", "pending") if counts.get(k))
    lines = ["# Mutation testing of rail_interview/stat_tracking", "", f"{share(counts)}; {others or 'nothing else'}"]
    lines += ["", "| module | killed share |", "| --- | --- |"]
    lines += [f"| {module} | {share(c)} |" for module, c in summary["per_module"].items()]
    lines += ["", f"## Survivors ({len(summary['survivors'])})", ""]
    for s in summary["survivors"]:
        head = f"### {s['module']}:{s['line']} {s['operator_name']} (occurrence {s['occurrence']})"
        lines += [head, "", "```diff", s["diff"].strip(), "```", ""]
    return "\n".join(lines) + "\n"


def run(command: Sequence[str], tree: pathlib.Path, env: Dict[str, str], log: Optional[pathlib.Path] = None) -> str:
    """Runs a command in ``tree``; returns its stdout, also appended to ``log`` (raises if it fails)."""
    result = subprocess.run(list(command), cwd=tree, env=env, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"$ {shlex.join(command)}\n{result.stdout}{result.stderr}")
    result.check_returncode()
    return result.stdout


def prepare(scratch: pathlib.Path, out: pathlib.Path, names: Optional[Sequence[str]], count: int) -> List[Worker]:
    """Copies the working tree once per worker and writes each worker's config and empty log."""
    copy_tree(scratch / "copy0")
    workers = []
    for i, modules in enumerate(split_modules(scratch / "copy0", select_modules(scratch / "copy0", names), count)):
        worker = Worker(scratch / f"copy{i}", out / f"worker{i}", modules)
        if i:
            shutil.copytree(scratch / "copy0", worker.tree)
        worker.out.mkdir(exist_ok=True)
        (worker.out / "cosmic-ray.toml").write_text(worker_config((worker.tree / CONFIG).read_text(), modules))
        (worker.out / "session.sqlite").unlink(missing_ok=True)  # cosmic-ray init refuses one that holds results
        (worker.out / "log.txt").write_text("")
        workers.append(worker)
    return workers


def execute(workers: Sequence[Worker], out: pathlib.Path) -> Dict:
    """Checks the unmutated tests in the first copy, then runs every session at once; returns the summary.

    Raises:
        RuntimeError: the copy does not import its own package, or its unmutated tests fail.
    """
    # This interpreter's cosmic-ray and python, the copy's package, one torch thread per worker.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env["PATH"]])
    envs = [dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(w.tree), env.get("PYTHONPATH")]))) for w in workers]
    where = run([sys.executable, "-c", "import rail_interview as m; print(m.__file__)"], workers[0].tree, envs[0])
    if not pathlib.Path(where.strip()).is_relative_to(workers[0].tree):
        raise RuntimeError(f"the copy imports rail_interview from {where.strip()}, not from {workers[0].tree}")
    print("unmutated tests (cosmic-ray baseline) ...", flush=True)
    baseline = ["cosmic-ray", "baseline", str(workers[0].out / "cosmic-ray.toml")]
    if subprocess.run(baseline, cwd=workers[0].tree, env=envs[0]).returncode:
        raise RuntimeError("the unmutated tests fail in the copy: fix them first")
    for worker, env in zip(workers, envs):
        for command in commands(worker)[:-1]:
            run(command, worker.tree, env, worker.out / "log.txt")
    dump = [["cosmic-ray", "dump", str(w.out / "session.sqlite")] for w in workers]
    pending = summarize([run(command, w.tree, e) for command, w, e in zip(dump, workers, envs)])["counts"]
    print(f"{pending.get('pending', 0)} mutants; progress in {out}/worker*/log.txt", flush=True)
    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(lambda w, e: run(commands(w)[-1], w.tree, e, w.out / "log.txt"), workers, envs))
    return summarize([run(command, w.tree, e) for command, w, e in zip(dump, workers, envs)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses the command line, runs the sessions in scratch copies and prints the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog="Needs pip install cosmic-ray.")
    parser.add_argument("--out", type=pathlib.Path, help="directory for the report and sessions (default: temp dir)")
    parser.add_argument("--workers", type=int, default=2, help="copies testing mutants at once (default 2)")
    parser.add_argument("--modules", nargs="+", help="modules to mutate (batch.py); default: the config's")
    parser.add_argument("--dry-run", action="store_true", help="make the copies, print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    elif not args.dry_run and shutil.which("cosmic-ray") is None:
        print("cosmic-ray is not installed: pip install cosmic-ray", file=sys.stderr)
        return 2
    out = (args.out or pathlib.Path(tempfile.mkdtemp(prefix="rail_mutation_"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="rail_mutation_scratch_")).resolve()
    try:
        workers = prepare(scratch, out, args.modules, args.workers)
        for w in workers:
            print(f"{w.tree}: {' '.join(w.modules)}\n" + "".join(f"  {shlex.join(c)}\n" for c in commands(w)), end="")
        if args.dry_run:
            return 0
        summary = execute(workers, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (out / "report.md").write_text(format_report(summary))
    print(format_report(summary) + f"written: {out / 'report.md'}; sessions and logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
