"""Runs the CUDA tests and the GPU benchmark on a CUDA machine, and writes one JSON report.

Usage:
    python benchmarks/gpu_check.py             # the tests and the benchmarks' headline grids
    python benchmarks/gpu_check.py --quick     # the tests and the benchmarks' quick grids

The checks are tests: ``pytest -m cuda tests`` (tests/test_cuda.py and the
CUDA tests of tests/test_tracker_contract.py: CUDA equals CPU, no host sync,
CUDA-graph replay, determinism, training; several rewards per sample too;
the compiled fast path, ``CompiledUpdate``, whose launch-count test records
the kernel launches of one eager update against one replay, and their
times, as the test's ``properties`` in the report).
Then ``benchmarks/bench_trackers.py --device=cuda``, which checks every
tracker against the reference before timing it, and the benchmarks of
``MORE_BENCHMARKS`` on CUDA (SPO's tracker against the recipe's dicts;
C = 4 rewards against single-reward trackers combined by hand), each of
which checks agreement before timing too. The report,
``<out>/gpu_check_<gpu-name>.json``, holds the device, the versions, every
test's outcome and the benchmarks' milliseconds per update
(docs/testing.md): bench_trackers.py's in ``benchmark``, the others' in
``benchmark["more"]`` by script. It is written after the tests and again at
the end.

Exit status: 0 when every CUDA test passed (a CUDA test skipped on a GPU is a
failure) and every benchmark ran, 1 otherwise, 2 without a CUDA device.
"""

import argparse
import datetime
import json
import pathlib
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _number(value: Optional[str]) -> object:
    """A recorded property's value: an int or a float where it reads as one, else the text."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def run_tests(out: pathlib.Path, paths: Sequence[str] = ("tests",), cwd: pathlib.Path = REPO_ROOT) -> Dict:
    """Runs ``pytest -m cuda`` in a subprocess and reads each test's outcome from its JUnit XML.

    Args:
        out: where the XML goes (``gpu_check_tests.xml``).
        paths: the test paths, relative to ``cwd``.
        cwd: the directory pytest runs in.

    Returns:
        ``command``, ``exit_code``, ``counts`` (passed, failed, error, skipped)
        and ``tests`` (name, outcome, seconds, message, and ``properties``
        where the test recorded figures with ``record_property``).
    """
    xml = out / "gpu_check_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    result = subprocess.run([*command, *paths], cwd=cwd, capture_output=True, text=True)
    tests = []
    for case in ElementTree.parse(xml).iter("testcase") if xml.exists() else []:
        found = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[found[0].tag] if found else "passed"
        message = found[0].get("message") if found else None
        name = f"{case.get('classname')}::{case.get('name')}"
        test = {"name": name, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
        # Figures a test recorded with pytest's record_property (the fast path's kernel launches).
        properties = {item.get("name"): _number(item.get("value")) for item in case.iter("property")}
        tests.append(dict(test, properties=properties) if properties else test)
    counts = {key: sum(t["outcome"] == key for t in tests) for key in ("passed", "failed", "error", "skipped")}
    shown = ["python", *command[1:-1], *paths]
    return {"command": " ".join(shown), "exit_code": result.returncode, "counts": counts, "tests": tests}


#: The benchmarks run after bench_trackers.py: script -> (its flags for the full run, for --quick).
MORE_BENCHMARKS: Dict[str, Tuple[List[str], List[str]]] = {
    "bench_spo.py": (["--rounds=3", "--min_run_time=0.2"], ["--quick"]),
    "bench_multi_reward.py": (["--rounds=3", "--min_run_time=0.2"], ["--quick"]),
}


def run_script(script: str, args: Sequence[str], out: pathlib.Path, device: str) -> Dict:
    """Runs ``benchmarks/<script>`` on ``device`` with ``args``, writing its JSON into ``out``.

    Returns:
        ``command``, ``exit_code`` and, when it wrote its JSON, ``json`` (the
        path) and ``ms_per_update`` (its rows); else ``output_tail``.
    """
    command = [f"benchmarks/{script}", f"--device={device}", f"--out={out}", *args]
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    report: Dict = {"command": " ".join(["python", *command]), "exit_code": result.returncode}
    written = re.findall(r"^Wrote (.+\.json)", result.stdout, flags=re.MULTILINE)
    if result.returncode or not written:
        return dict(report, output_tail=(result.stdout + result.stderr)[-4000:])
    rows = json.loads(pathlib.Path(written[-1]).read_text())["results"]
    return dict(report, json=written[-1], ms_per_update=[{k: v for k, v in r.items() if k != "rounds"} for r in rows])


def run_benchmark(out: pathlib.Path, quick: bool, device: str = "cuda") -> Dict:
    """Runs ``benchmarks/bench_trackers.py``, then each of ``MORE_BENCHMARKS``, on ``device``, their JSON into ``out``.

    Returns:
        bench_trackers.py's ``command``, ``exit_code`` and, when it wrote its
        JSON, ``json`` (the path) and ``ms_per_update`` (its rows), else
        ``output_tail``; and ``more``: the same for each other script, by name.
    """
    grid = ["--grid=quick", "--rounds=1", "--min_run_time=0.01"] if quick else ["--grid=headline", "--rounds=3"]
    report = run_script("bench_trackers.py", grid, out, device)
    more = {script: run_script(script, flags[quick], out, device) for script, flags in MORE_BENCHMARKS.items()}
    return dict(report, more=more)


def describe_device() -> Dict:
    """The CUDA device's name, compute capability and memory."""
    properties = torch.cuda.get_device_properties(0)
    memory_gib = round(properties.total_memory / 2**30, 1)
    return {"name": properties.name, "capability": f"{properties.major}.{properties.minor}", "memory_gib": memory_gib}


def passed(report: Dict) -> bool:
    """Whether every CUDA test ran and passed, and every benchmark wrote its figures."""
    tests = report["tests"]
    every_test_passed = tests["exit_code"] == 0 and tests["tests"] and tests["counts"]["passed"] == len(tests["tests"])
    benchmark = report.get("benchmark", {})
    every_benchmark_ran = all("ms_per_update" in run for run in [benchmark, *benchmark.get("more", {}).values()])
    return bool(every_test_passed) and every_benchmark_ran


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the tests and the benchmark, writes the report and returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="the benchmark's quick grid, one round")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    device = describe_device()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{re.sub(r'[^a-z0-9]+', '-', device['name'].lower()).strip('-')}.json"
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "quick": args.quick,
    }
    print(f"gpu_check on {device['name']}, torch {torch.__version__}; report: {path}", flush=True)
    report["tests"] = run_tests(args.out)
    path.write_text(json.dumps(report, indent=1))  # in case the machine goes away during the benchmark
    print(f"{report['tests']['command']}: {report['tests']['counts']}", flush=True)
    report["benchmark"] = run_benchmark(args.out, args.quick)
    report["passed"] = passed(report)
    path.write_text(json.dumps(report, indent=1))
    for run in [report["benchmark"], *report["benchmark"].get("more", {}).values()]:
        print(f"{run['command']}: exit {run['exit_code']}")
    print(f"passed: {report['passed']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
