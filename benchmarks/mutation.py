"""Mutation testing of rail_interview/stat_tracking with cosmic-ray (kept out of CI).

Usage:
    pip install cosmic-ray                              # not in the test extra: this is too slow for CI
    python benchmarks/mutation.py                       # every module of stat_tracking but reference.py
    python benchmarks/mutation.py --modules batch.py    # one module: a trial of about a minute
    python benchmarks/mutation.py --count-only          # how many mutants, without running them
    python benchmarks/mutation.py --rev HEAD --out /tmp/mut   # a committed revision; results in /tmp/mut

What it does. cosmic-ray makes one small change (a mutant) at a time to a
module, e.g. ``<`` to ``<=`` or ``1`` to ``2``, and runs the tests; a mutant
that some test fails on is killed, one that passes every test survived and
marks behaviour that no test pins down. cosmic-ray edits files in place, so
nothing here touches the checkout: the working tree (tracked and untracked,
not ignored, files; or ``git archive`` of ``--rev``) is copied once per worker
into a scratch directory, and each copy gets its own cosmic-ray HTTP worker
(on 127.0.0.1), so ``--workers`` mutants are tested at once. Before any
mutant, the unmutated tests must pass in a copy and the copy's package must
be the one imported (the checkout's editable install must not shadow it).

Fork server. Starting Python and importing torch, matplotlib, hypothesis
and pytest takes about 3 s, more than the tests that kill most mutants. So
each copy also gets a server that imports those once (never rail_interview)
and forks a child per mutant that imports the mutated package afresh and runs
``pytest.main`` in the copy: a killed mutant costs 1.6 s instead of 4.5.
cosmic-ray still runs a command per mutant (this file's ``_pytest`` client,
with cosmic-ray's timeout) and reads its exit code; if the server cannot be
reached, the client runs ``python -m pytest`` itself and says so in the
output. ``--no-fork-server`` runs ``python -m pytest`` for every mutant.

Tests run per mutant: the doctests of stat_tracking's modules, then
tests/test_batch_tracker.py, test_prompt_index.py, test_ops.py,
test_buffer_tracker.py, test_ema_tracker.py, test_tracker_contract.py,
test_recording.py and any other tests/test_*tracker*.py, as ``pytest -x -q
-p no:cacheprovider`` (``-x``: a mutant is killed at its first failing test).
Left out: the two tests that run scripts/plot_stats.py in a subprocess (``-k
"not plot_script"``; the loading code they reach is covered by
test_recording's round-trip tests), and the end-to-end files that also touch
stat_tracking (listed at start-up: tests/test_distributed.py alone takes
20 s). Add one with ``--extra-tests``; without the distributed tests, mutants
of the ``process_group`` branches survive by construction. reference.py, the
plain-Python oracle that the tests compare the tensor trackers against, is
not mutated: its mutants would measure how well the tests check the oracle,
not the trackers (``--modules reference.py`` runs it anyway).

Operators. cosmic-ray's full set gives 1,778 mutants here (at the time of
writing), 11 per arithmetic operator and 7 per comparison, and the extra ones are
nearly always killed with (or equivalent to) a sibling. So, unless
``--all-operators``, each binary operator gets one replacement (+ -, - +,
* /, / *, // /, % //, ** *, | &, & |, ^ |, << >>, >> <<), each comparison
its boundary and its negation (< to <= and >=, <= to < and >, > to >= and <=,
>= to > and <, == !=, != ==, is to is not, is not to is), each unary operator
its sign flip or its removal (+x -x, -x +x, not x to x, ~x to x); every other
cosmic-ray operator runs in full (numbers +1 and -1, ``not`` added to
conditions, True/False, and/or, break/continue, exception replacement,
decorator removal, zero-iteration for loops): 697 mutants (``--count-only``
prints the count). Lines marked ``# pragma: no mutate`` are skipped
(cosmic-ray's cr-filter-pragma): use it for a mutant judged equivalent, with
a comment saying why.

How long. Measured on the project's 2-core machine, 2 workers, other work
running beside: a killed mutant takes 1.6 s, a survivor 12 s (the whole
test run, of which the torch.compile tests are about 5 s), so 3.2-3.7 s per
mutant per worker at the 13-15 % that survived in batch.py and ema.py: 697
mutants in about 20 minutes, about 30 if a third of them survive. Without the
fork server it is 6.2 s per mutant per worker (killed 4.5 s, survived 16.5 s),
with the same mutants killed. The per-mutant timeout (a timed-out mutant
counts as killed) is 4 times the unmutated run, at least 60 s and at most
240 s (cosmic-ray's HTTP client gives up at 300 s). The unmutated tests must
pass first: fix a failing one, or leave it out with ``--deselect NODE_ID``.

How to read the result. Printed and written to ``<out>/report.md``: the
killed share, killed / (killed + survived), overall, per module and per
operator; then every survivor with file, line, operator, function and diff.
A survivor is either a missing test (write it) or an equivalent mutant (a
change no caller can observe, e.g. ``shape[0]`` to ``shape[-1]`` of a 1-D
tensor, which the report notes as likely equivalent; ``# pragma: no mutate``
on the line skips every mutant of that line). Timeouts count as killed;
"incompetent" or abnormal results (the machinery failed, not the tests) are
listed apart and left out of the share. ``<out>`` also keeps the session
(``cr-html <out>/session.sqlite > report.html`` gives cosmic-ray's own report;
its cr-rate counts filtered-out mutants as killed, so quote this report's
share), the config, the unmutated run's output and the logs.
"""

import argparse
import collections
import contextlib
import io
import json
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from typing import Dict, List, Optional, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = "rail_interview/stat_tracking"
#: Not mutated unless named in --modules: the tests' oracle (see the docstring).
EXCLUDED_MODULES = ("reference.py",)
#: Run per mutant in this order (fast, broad ones first: -x stops at the first failure). Missing ones are skipped.
TEST_FILES = (
    "tests/test_batch_tracker.py",
    "tests/test_advantage_tracker.py",
    "tests/test_prompt_index.py",
    "tests/test_ops.py",
    "tests/test_buffer_tracker.py",
    "tests/test_ema_tracker.py",
    "tests/test_tracker_contract.py",
    "tests/test_recording.py",
    "tests/test_presets.py",
    "tests/test_keys.py",
    "tests/test_ddpo_compat.py",
)
#: Further tracker tests, picked up as they are added.
TEST_GLOB = "tests/test_*tracker*.py"
#: Subprocess tests of scripts/plot_stats.py; see the docstring.
DESELECT = "not plot_script"
#: Imported once by the fork server; a missing one is imported by each child instead.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "numpy",
    "matplotlib",
    "matplotlib.pyplot",
    "ml_collections",
    "absl.app",
    "absl.flags",
    "hypothesis",
    "hypothesis.strategies",
    "pytest",
)
#: The client finds its copy's fork server through this environment variable.
SERVER_ENV = "RAIL_MUTATION_SERVER"
_EXIT_MARKER = "\n__rail_mutation_exit__ "
_FALLBACK_NOTE = "[mutation.py: fork server unavailable, running python -m pytest]"

#: Binary, comparison and unary operator replacements that run; cosmic-ray's other ones are filtered out.
KEPT_REPLACEMENTS = {
    "ReplaceBinaryOperator": (
        "Add_Sub",
        "Sub_Add",
        "Mul_Div",
        "Div_Mul",
        "FloorDiv_Div",
        "Mod_FloorDiv",
        "Pow_Mul",
        "BitOr_BitAnd",
        "BitAnd_BitOr",
        "BitXor_BitOr",
        "LShift_RShift",
        "RShift_LShift",
    ),
    "ReplaceComparisonOperator": (
        "Eq_NotEq",
        "NotEq_Eq",
        "Lt_LtE",
        "Lt_GtE",
        "LtE_Lt",
        "LtE_Gt",
        "Gt_GtE",
        "Gt_LtE",
        "GtE_Gt",
        "GtE_Lt",
        "Is_IsNot",
        "IsNot_Is",
    ),
    "ReplaceUnaryOperator": ("UAdd_USub", "USub_UAdd", "Delete_Not", "Delete_Invert"),
}
#: cosmic-ray's HTTP client gives up on a worker after 300 s.
MAX_TIMEOUT = 240.0
MIN_TIMEOUT = 60.0


def excluded_operator_patterns() -> List[str]:
    """Regular expressions of the operators to leave out, for cr-filter-operators.

    Returns:
        One pattern per operator family of ``KEPT_REPLACEMENTS``; it matches
        (``re.match``) every operator name of the family but the kept ones.
    """
    return [f"core/{family}_(?!(?:{'|'.join(kept)})$)" for family, kept in KEPT_REPLACEMENTS.items()]


def is_excluded_operator(name: str, patterns: Sequence[str]) -> bool:
    """Whether cr-filter-operators leaves out the operator ``name`` (it uses ``re.match``)."""
    return any(re.match(pattern, name) for pattern in patterns)


def select_modules(tree: pathlib.Path, names: Optional[Sequence[str]] = None) -> List[str]:
    """The modules to mutate, as paths relative to the tree's root.

    Args:
        tree: a copy of the repository.
        names: file names under stat_tracking (``batch.py``) or paths relative
            to the root; None for every module but ``EXCLUDED_MODULES``.

    Returns:
        Sorted relative paths.

    Raises:
        FileNotFoundError: a named module does not exist.
    """
    package = tree / PACKAGE_DIR
    if names is None:
        return sorted(
            path.relative_to(tree).as_posix() for path in package.glob("*.py") if path.name not in EXCLUDED_MODULES
        )
    modules = []
    for name in names:
        path = package / name if "/" not in name else tree / name
        if not path.is_file():
            raise FileNotFoundError(f"no module {path}")
        modules.append(path.relative_to(tree).as_posix())
    return sorted(modules)


def select_tests(tree: pathlib.Path, extra: Sequence[str] = ()) -> List[str]:
    """The test paths run per mutant, in order: stat_tracking's doctests, ``TEST_FILES``, ``TEST_GLOB``, ``extra``."""
    tests = [PACKAGE_DIR]
    tests += [name for name in TEST_FILES if (tree / name).is_file()]
    tests += sorted(path.relative_to(tree).as_posix() for path in tree.glob(TEST_GLOB))
    tests += list(extra)
    return list(dict.fromkeys(tests))


_IMPORTS_STAT_TRACKING = re.compile(
    r"^\s*(import|from)\s+rail_interview\.stat_tracking\b"
    r"|^\s*from\s+rail_interview\s+import\s[^\n]*\bstat_tracking\b",
    re.M,
)


def unselected_tests(tree: pathlib.Path, tests: Sequence[str]) -> List[str]:
    """Test files that import stat_tracking but are not run per mutant."""
    return sorted(
        path.relative_to(tree).as_posix()
        for path in tree.glob("tests/test_*.py")
        if path.relative_to(tree).as_posix() not in tests and _IMPORTS_STAT_TRACKING.search(path.read_text())
    )


def pytest_args(tests: Sequence[str], deselect: Optional[str] = DESELECT, node_ids: Sequence[str] = ()) -> List[str]:
    """The pytest arguments run in a copy for each mutant.

    Args:
        tests: paths to run, in order.
        deselect: a ``-k`` expression, or None.
        node_ids: tests to leave out with ``--deselect``.
    """
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]
    if deselect:
        args += ["-k", deselect]
    for node_id in node_ids:
        args += ["--deselect", node_id]
    return args + list(tests)


def mutant_test_command(python: str, args: Sequence[str], runner: Optional[str]) -> List[str]:
    """The command cosmic-ray runs per mutant.

    Args:
        python: the interpreter.
        args: pytest's arguments.
        runner: a copy of this file, whose ``_pytest`` client asks the fork
            server; None to run ``python -m pytest``.
    """
    if runner is None:
        return [python, "-m", "pytest", *args]
    # pytest warns that it cannot rewrite the asserts of the preloaded hypothesis plugin; that is expected.
    return [python, runner, "_pytest", "-W", "ignore::pytest.PytestAssertRewriteWarning", *args]


def _toml_value(value) -> str:
    # A JSON string, number or list of strings is also a TOML one.
    return json.dumps(value)


def build_config(
    modules: Sequence[str],
    command: Sequence[str],
    timeout: float,
    worker_urls: Sequence[str],
    exclude_operators: Sequence[str],
) -> str:
    """The cosmic-ray configuration (TOML).

    Args:
        modules: paths of the modules to mutate, relative to a copy's root.
        command: the test command, one argument per item.
        timeout: seconds after which a mutant's test run is stopped (and the mutant counted as killed).
        worker_urls: the HTTP workers, one per copy.
        exclude_operators: patterns for cr-filter-operators.

    Returns:
        The text of the config file.
    """
    lines = [
        "[cosmic-ray]",
        f"module-path = {_toml_value(list(modules))}",
        "excluded-modules = []",
        f"timeout = {float(timeout)!r}",
        f"test-command = {_toml_value(shlex.join(command))}",
        "",
        "[cosmic-ray.distributor]",
        'name = "http"',
        "",
        "[cosmic-ray.distributor.http]",
        f"worker-urls = {_toml_value(list(worker_urls))}",
        "",
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {_toml_value(list(exclude_operators))}",
    ]
    return "\n".join(lines) + "\n"


def copy_tree(destination: pathlib.Path, rev: Optional[str]) -> None:
    """Copies the repository's source into ``destination`` (no .git, no caches, no build output).

    Args:
        destination: an empty directory.
        rev: a git revision to copy with ``git archive``; None for the working
            tree as it is, uncommitted and untracked (not ignored) files included.
    """
    if rev is not None:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=REPO_ROOT, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(destination, filter="data")
            else:  # Python < 3.11.4; the archive is this repository's own
                tar.extractall(destination)
        return
    if (REPO_ROOT / ".git").exists():
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        ).stdout
        for name in filter(None, listing.decode().split("\0")):
            source = REPO_ROOT / name
            if source.is_file():  # a tracked file deleted in the working tree is not copied
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name)
        return
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "venv", ".venv", "build", "dist", "logs"
    )
    shutil.copytree(REPO_ROOT, destination, ignore=ignore, dirs_exist_ok=True)


def worker_env(tree: pathlib.Path, server: Optional[pathlib.Path] = None) -> Dict[str, str]:
    """The environment of a copy's worker, server and test runs.

    The copy comes first on the path; one thread per test run (two workers
    share two cores); no .pyc files, since a mutant of the same size written
    within a second of the previous one could be shadowed by stale bytecode.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(SERVER_ENV, None)
    if server is not None:
        env[SERVER_ENV] = str(server)
    return env


# ----------------------------------------------------------------------------------------------------------------
# The fork server and its client (see the docstring). Both run as this file: `python mutation.py _serve SOCKET`
# and `python mutation.py _pytest ARGS...`.


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def _run_child(connection: socket.socket, request: Dict) -> None:
    """In the forked child: runs pytest in the request's directory, writing to the connection, and exits."""
    try:
        os.setpgid(0, 0)  # the server kills the child's whole group if the client goes away
        os.dup2(connection.fileno(), 1)
        os.dup2(connection.fileno(), 2)
        os.chdir(request["cwd"])
        sys.path.insert(0, request["cwd"])  # as `python -m pytest` does
        sys.argv = ["pytest", *request["args"]]
        import pytest  # pylint: disable=import-outside-toplevel

        code = int(pytest.main(list(request["args"])))
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        code = 70
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


_running_child: List[int] = []


def _stop_server(*_) -> None:
    """SIGTERM in the server: kills the test run in progress, then exits."""
    for pid in _running_child:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    os._exit(0)  # pylint: disable=protected-access


def _serve_one(server: socket.socket, connection: socket.socket) -> None:
    with connection:
        data = b""
        while not data.endswith(b"\n"):
            chunk = connection.recv(65536)
            if not chunk:
                return
            data += chunk
        request = json.loads(data)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            server.close()
            _run_child(connection, request)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # as the child does, so that killpg works from the start
        _running_child[:] = [pid]
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                readable, _, _ = select.select([connection], [], [], 0.1)
                if readable and not connection.recv(1):  # the client went away (cosmic-ray's timeout)
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return
            with contextlib.suppress(OSError):  # anything a test left running in the child's group
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                connection.sendall(f"{_EXIT_MARKER}{os.waitstatus_to_exitcode(status)}\n".encode())
        finally:
            _running_child.clear()


def serve(path: str, preload: Sequence[str] = PRELOAD) -> None:
    """Imports ``preload``, then forks a pytest child per connection on the Unix socket ``path``.

    Returns when the process that started the server is gone.
    """
    parent = os.getppid()
    for name in preload:
        with contextlib.suppress(ImportError):
            __import__(name)
    if any(name == "rail_interview" or name.startswith("rail_interview.") for name in sys.modules):
        raise RuntimeError("the fork server must not import rail_interview: children import the mutant")
    signal.signal(signal.SIGTERM, _stop_server)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(4)
        server.settimeout(1.0)
        while not _parent_gone(parent):
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            connection.settimeout(None)
            _serve_one(server, connection)


def run_client(args: Sequence[str]) -> int:
    """Runs pytest with ``args`` in the fork server named by ``$RAIL_MUTATION_SERVER``; returns its exit code.

    Falls back to ``python -m pytest`` (with a note in the output) if there is
    no server or it does not answer with an exit code.
    """
    parent = os.getppid()
    path = os.environ.get(SERVER_ENV)
    if path:
        received = b""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as connection:
            connection.connect(path)
            connection.sendall(json.dumps({"cwd": os.getcwd(), "args": list(args)}).encode() + b"\n")
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
        text = received.decode(errors="replace")
        output, marker, code = text.rpartition(_EXIT_MARKER)
        if marker and code.strip().lstrip("-").isdigit():
            sys.stdout.write(output)
            sys.stdout.flush()
            return int(code)
    if _parent_gone(parent):  # the worker was stopped (the run is shutting down): nothing to fall back for
        return 1
    print(_FALLBACK_NOTE, flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", *args], check=False).returncode


# ----------------------------------------------------------------------------------------------------------------
# cosmic-ray's HTTP worker (cosmic_ray.distribution.http.run_worker) listens on every interface; this one listens
# on 127.0.0.1 only, exits with its parent, and appends each mutant's seconds and outcome to the file in argv[2].
_WORKER_CODE = """
import asyncio, json, os, sys, time
from aiohttp import web
from cosmic_ray.distribution.http import handle_mutate_and_test

PARENT = os.getppid()

async def timed(request):
    start = time.perf_counter()
    response = await handle_mutate_and_test(request)
    outcome = json.loads(response.text)["test_outcome"]
    with open(sys.argv[2], "a") as log:
        log.write(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome}) + "\\n")
    return response

async def watch_parent(app):
    async def watch():
        while os.getppid() == PARENT:
            await asyncio.sleep(1)
        os._exit(0)
    app["watch"] = asyncio.create_task(watch())

app = web.Application()
app.add_routes([web.post("/", timed)])
app.on_startup.append(watch_parent)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(ready, process: subprocess.Popen, what: str, log: pathlib.Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited; see {log}:\n{log.read_text()[-2000:]}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {seconds} s; see {log}")


def _accepts(address, family=socket.AF_INET) -> bool:
    with contextlib.closing(socket.socket(family)) as sock:
        return sock.connect_ex(address) == 0


def _cosmic_ray(*args: str, cwd: pathlib.Path, module: str = "cosmic_ray.cli") -> None:
    subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, check=True)


def baseline(tree: pathlib.Path, command: Sequence[str], env: Dict[str, str], out: pathlib.Path) -> float:
    """Runs the unmutated tests in ``tree`` as cosmic-ray will; returns their seconds.

    Raises:
        RuntimeError: the copy's package is not the one imported, or a test fails.
    """
    where = subprocess.run(
        [sys.executable, "-c", "import rail_interview.stat_tracking as m; print(m.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not pathlib.Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the copy imports rail_interview from {where}, not from {tree}")
    start = time.perf_counter()
    result = subprocess.run(list(command), cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / "baseline.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"the unmutated tests fail in the copy (exit {result.returncode}): fix them or leave "
            f"them out with --deselect; see {out / 'baseline.txt'}:\n{result.stdout[-3000:]}"
        )
    if _FALLBACK_NOTE in result.stdout:
        raise RuntimeError(f"the fork server did not answer; see the server logs in {out}")
    return seconds


def _progress(session: pathlib.Path, total: int, start: float, done: threading.Event, every: float) -> None:
    while not done.wait(every):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{session}?mode=ro", uri=True, timeout=5)) as db:
                finished = db.execute(
                    "SELECT count(*) FROM work_results WHERE upper(worker_outcome) != 'SKIPPED'"
                ).fetchone()[0]
        except sqlite3.Error:
            continue
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed / finished * (total - finished) / 60:.0f} min left" if finished else ""
        print(f"  {finished}/{total} mutants in {elapsed / 60:.1f} min{eta}", flush=True)


def load_results(session: pathlib.Path):
    """Reads a session: ``(pending job count, [(mutation, result)])`` with one mutation per work item."""
    from cosmic_ray.work_db import WorkDB, use_db  # pylint: disable=import-outside-toplevel

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = len(db.pending_work_items)
        return pending, [(item.mutations[0], result) for item, result in db.completed_work_items]


#: A +line of a diff where NumberReplacer turned a dimension 0 into -1: the same dimension of a 1-D tensor.
_DIM_ZERO_TO_LAST = re.compile(
    r"(shape\[ -1\]|\bdim= -1\b|\.(index_\w+|gather|scatter\w*|size|cumsum|cumprod|sum|mean|"
    r"amax|amin|narrow|select|flip|unsqueeze|squeeze|argsort|sort|softmax|split)\( -1\b)"
)


def likely_equivalent(operator: str, diff: Optional[str]) -> Optional[str]:
    """A note if a survivor looks equivalent by a known pattern, else None.

    The pattern: dimension 0 made -1 (``shape[0]``, ``dim=0``, ``index_select(0, ...)``),
    which is the same dimension of the 1-D tensors most of this package holds.
    """
    if not operator.endswith("NumberReplacer") or not diff:
        return None
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if any(_DIM_ZERO_TO_LAST.search(line) for line in added):
        return "likely equivalent: dimension 0 -> -1, the same dimension of a 1-D tensor"
    return None


def summarize(pending: int, completed) -> Dict:
    """Counts outcomes overall, per module and per operator family.

    Args:
        pending: work items without a result.
        completed: ``(MutationSpec, WorkResult)`` pairs.

    Returns:
        A JSON-able dict; "killed_share" is killed / (killed + survived).
    """

    def empty():
        """A counter of killed and survived mutants, both at 0."""
        return collections.Counter(killed=0, survived=0)

    overall, per_module, per_operator = empty(), collections.defaultdict(empty), collections.defaultdict(empty)
    survivors, broken = [], []
    for mutation, result in completed:
        outcome = result.worker_outcome.value
        if outcome in ("skipped", "no-test"):
            overall[outcome] += 1
            continue
        if outcome != "normal" or result.test_outcome.value == "incompetent":
            broken.append((mutation, result))
            overall["incompetent or abnormal"] += 1
            continue
        if _FALLBACK_NOTE in (result.output or ""):
            overall["fell back to python -m pytest"] += 1
        key = "killed" if result.test_outcome.value == "killed" else "survived"
        family = mutation.operator_name.split("/")[-1].split("_")[0]
        for counter in (overall, per_module[str(mutation.module_path)], per_operator[family]):
            counter[key] += 1
        if key == "survived":
            survivors.append((mutation, result))

    def share(counter):
        """killed / (killed + survived), or None before any mutant ran."""
        ran = counter["killed"] + counter["survived"]
        return counter["killed"] / ran if ran else None

    survivors.sort(key=lambda pair: (str(pair[0].module_path), pair[0].start_pos, pair[0].operator_name))
    return {
        "counts": dict(overall, pending=pending),
        "killed_share": share(overall),
        "per_module": {name: dict(c, share=share(c)) for name, c in sorted(per_module.items())},
        "per_operator": {name: dict(c, share=share(c)) for name, c in sorted(per_operator.items())},
        "survivors": [
            {
                "module": str(m.module_path),
                "line": m.start_pos[0],
                "operator": m.operator_name,
                "occurrence": m.occurrence,
                "function": m.definition_name,
                "note": likely_equivalent(m.operator_name, r.diff),
                "diff": r.diff,
            }
            for m, r in survivors
        ],
        "broken": [
            {
                "module": str(m.module_path),
                "line": m.start_pos[0],
                "operator": m.operator_name,
                "outcome": r.worker_outcome.value,
                "output": (r.output or "")[-1000:],
            }
            for m, r in broken
        ],
    }


def seconds_by_outcome(files: Sequence[pathlib.Path]) -> Dict[str, Dict[str, float]]:
    """Per test outcome, the count, mean and total of the seconds a worker spent on a mutant."""
    seconds = collections.defaultdict(list)
    for path in files:
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                seconds[str(record["outcome"])].append(record["seconds"])
    return {
        outcome: {"count": len(values), "mean": sum(values) / len(values), "total": sum(values)}
        for outcome, values in sorted(seconds.items())
    }


_COUNT_LABELS = {
    "skipped": "filtered out (operator not in the set, or # pragma: no mutate)",
    "no-test": "not applicable",
    "incompetent or abnormal": "incompetent or abnormal (not counted)",
    "fell back to python -m pytest": "run without the fork server",
    "pending": "not run",
}


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(summary: Dict, timing: Dict) -> str:
    """The Markdown report: shares, timing, then every survivor with its diff."""
    counts = summary["counts"]
    lines = [
        "# Mutation testing of rail_interview/stat_tracking",
        "",
        f"Killed share: **{_percent(summary['killed_share'])}** "
        f"({counts['killed']} killed, {counts['survived']} survived"
        + "".join(f", {counts[k]} {label}" for k, label in _COUNT_LABELS.items() if counts.get(k))
        + ")",
        "",
        f"Code: {timing['rev']}; modules: {', '.join(timing['modules'])}",
        f"Operators: {timing['operators']}",
        f"Test command: `{timing['test_command']}`",
        f"Unmutated run {timing['baseline_s']:.1f} s; per-mutant timeout {timing['timeout_s']:.0f} s; "
        f"{timing['workers']} workers; {timing['mutants_run']} mutants in {timing['wall_s'] / 60:.1f} min "
        f"({timing['wall_s_per_mutant']:.2f} s of wall time per mutant, "
        f"{timing['worker_s_per_mutant']:.2f} s per mutant per worker)",
        "Seconds per mutant by outcome: "
        + (
            ", ".join(
                f"{outcome} {t['mean']:.1f} s (x{t['count']})" for outcome, t in timing["seconds_by_outcome"].items()
            )
            or "-"
        ),
        "",
        "| module | killed | survived | share |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {c['killed']} | {c['survived']} | {_percent(c['share'])} |"
        for name, c in summary["per_module"].items()
    ]
    lines += ["", "| operator | killed | survived | share |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {name} | {c['killed']} | {c['survived']} | {_percent(c['share'])} |"
        for name, c in summary["per_operator"].items()
    ]
    noted = sum(1 for survivor in summary["survivors"] if survivor["note"])
    lines += ["", f"## Survivors ({len(summary['survivors'])}, {noted} of them noted as likely equivalent)", ""]
    for survivor in summary["survivors"]:
        note = f" -- {survivor['note']}" if survivor["note"] else ""
        lines += [
            f"### {survivor['module']}:{survivor['line']} {survivor['operator']} "
            f"(occurrence {survivor['occurrence']}, in {survivor['function']}){note}",
            "",
            "```diff",
            (survivor["diff"] or "").strip(),
            "```",
            "",
        ]
    if summary["broken"]:
        lines += [f"## Incompetent or abnormal ({len(summary['broken'])}): the machinery failed, not the tests", ""]
        for item in summary["broken"]:
            lines += [
                f"### {item['module']}:{item['line']} {item['operator']} ({item['outcome']})",
                "",
                "```",
                item["output"].strip(),
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="Needs `pip install cosmic-ray`; the module docstring says more.",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="directory for report.md, summary.json, the session and logs (default: a new temp dir)",
    )
    parser.add_argument("--workers", type=int, default=2, help="mutants tested at once, one copy each (default 2)")
    parser.add_argument(
        "--modules",
        nargs="+",
        default=None,
        help="modules to mutate: names under stat_tracking (batch.py) or paths from the root "
        "(default: all but reference.py)",
    )
    parser.add_argument("--rev", default=None, help="test this git revision (default: the working tree as it is)")
    parser.add_argument(
        "--all-operators", action="store_true", help="every cosmic-ray replacement (about 3 times the mutants)"
    )
    parser.add_argument("--extra-tests", nargs="+", default=[], help="more test paths, e.g. tests/test_distributed.py")
    parser.add_argument(
        "--deselect",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="leave out a test that fails on the unmutated code (repeatable; say why in the report)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per mutant (default: 4 x the unmutated run, in [{MIN_TIMEOUT:.0f}, {MAX_TIMEOUT:.0f}])",
    )
    parser.add_argument("--no-fork-server", action="store_true", help="start python -m pytest for every mutant")
    parser.add_argument("--count-only", action="store_true", help="count the mutants and stop before running them")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the copies of the tree")
    parser.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def _start(command: Sequence[str], tree: pathlib.Path, env: Dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            list(command), cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Copies the tree, checks the unmutated tests, runs the mutants and writes the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:
        serve(argv[1])
        return 0
    if argv[:1] == ["_pytest"]:
        return run_client(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` cleans up
    try:
        import cosmic_ray  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        print("cosmic-ray is not installed: pip install cosmic-ray", file=sys.stderr)
        return 2
    out = (args.out or pathlib.Path(tempfile.mkdtemp(prefix="rail_mutation_"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="rail_mutation_scratch_"))
    trees = [scratch / f"copy{i}" for i in range(args.workers)]
    servers: List[subprocess.Popen] = []
    workers: List[subprocess.Popen] = []
    try:
        for tree in trees:
            tree.mkdir()
            copy_tree(tree, args.rev)
        runner = None
        if not args.no_fork_server:
            runner = str(scratch / "mutation_runner.py")
            shutil.copy(__file__, runner)
        sockets = [None if runner is None else scratch / f"copy{i}.sock" for i in range(len(trees))]
        envs = [worker_env(tree, sock) for tree, sock in zip(trees, sockets)]
        modules = select_modules(trees[0], args.modules)
        tests = select_tests(trees[0], args.extra_tests)
        command = mutant_test_command(sys.executable, pytest_args(tests, node_ids=args.deselect), runner)
        patterns = [] if args.all_operators else excluded_operator_patterns()
        print(f"copies of {'the working tree' if args.rev is None else args.rev} in {scratch}; results in {out}")
        print(f"test command: {shlex.join(command)}")
        left_out = unselected_tests(trees[0], tests)
        if left_out:
            print(f"not run per mutant (add with --extra-tests): {' '.join(left_out)}")

        if runner is not None:
            for i, (tree, sock, env) in enumerate(zip(trees, sockets, envs)):
                log = out / f"server{i}.log"
                servers.append(_start([sys.executable, runner, "_serve", str(sock)], tree, env, log))
                _wait_until(
                    lambda s=sock: s.exists() and _accepts(str(s), socket.AF_UNIX), servers[-1], f"fork server {i}", log
                )
        baseline_s = baseline(trees[0], command, envs[0], out)
        timeout = args.timeout or min(MAX_TIMEOUT, max(MIN_TIMEOUT, 4 * baseline_s))
        print(f"unmutated tests pass in {baseline_s:.1f} s; per-mutant timeout {timeout:.0f} s")

        ports = [_free_port() for _ in trees]
        config = out / "cosmic-ray.toml"
        config.write_text(build_config(modules, command, timeout, [f"http://127.0.0.1:{p}" for p in ports], patterns))
        session = out / "session.sqlite"
        session.unlink(missing_ok=True)
        _cosmic_ray("init", str(config), str(session), cwd=trees[0])
        _cosmic_ray(str(session), str(config), cwd=trees[0], module="cosmic_ray.tools.filters.operators_filter")
        _cosmic_ray(str(session), cwd=trees[0], module="cosmic_ray.tools.filters.pragma_no_mutate")
        pending, _ = load_results(session)
        print(
            f"{pending} mutants in {len(modules)} module(s) ({'all' if args.all_operators else 'restricted'} "
            f"operators); if every one survived: {pending * baseline_s / args.workers / 60:.0f} min"
        )
        if args.count_only:
            return 0

        times = [out / f"worker{i}_times.jsonl" for i in range(len(trees))]
        for i, (tree, port, env) in enumerate(zip(trees, ports, envs)):
            log = out / f"worker{i}.log"
            times[i].unlink(missing_ok=True)
            workers.append(_start([sys.executable, "-c", _WORKER_CODE, str(port), str(times[i])], tree, env, log))
            _wait_until(lambda p=port: _accepts(("127.0.0.1", p)), workers[-1], f"worker {i}", log)

        start = time.perf_counter()
        done = threading.Event()
        threading.Thread(
            target=_progress, args=(session, pending, start, done, args.progress_every), daemon=True
        ).start()
        try:
            _cosmic_ray("exec", str(config), str(session), cwd=trees[0])
        finally:
            done.set()
        wall_s = time.perf_counter() - start

        left, completed = load_results(session)
        summary = summarize(left, completed)
        ran = max(1, pending - left)
        timing = {
            "rev": args.rev or "the working tree",
            "modules": modules,
            "operators": "all cosmic-ray operators"
            if args.all_operators
            else "restricted (benchmarks/mutation.py: KEPT_REPLACEMENTS)",
            "test_command": shlex.join(command),
            "baseline_s": baseline_s,
            "timeout_s": timeout,
            "workers": args.workers,
            "mutants_run": pending - left,
            "wall_s": wall_s,
            "wall_s_per_mutant": wall_s / ran,
            "worker_s_per_mutant": wall_s * args.workers / ran,
            "seconds_by_outcome": seconds_by_outcome(times),
        }
        report = format_report(summary, timing)
        (out / "report.md").write_text(report)
        (out / "summary.json").write_text(json.dumps({**summary, "timing": timing}, indent=1))
        print(report)
        print(f"written: {out / 'report.md'}, {out / 'summary.json'}, {session}")
        return 0
    finally:
        # Workers first (a worker in a test run answers SIGTERM only when the run ends; nothing of theirs is worth
        # keeping), then the servers, whose SIGTERM handler kills the test run in progress.
        for process in workers:
            process.kill()
        for process in servers:
            process.terminate()
        for process in workers + servers:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if args.keep_scratch:
            print(f"copies kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
