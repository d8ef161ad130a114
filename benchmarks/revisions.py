"""The package as it is at another git revision, imported beside the working tree's, for A/B benchmarks.

``ab_trackers.py`` and ``bench_multi_reward.py --ab_rev`` time the update of
a revision against the working tree's in one process. This module holds the
import they share; it defines no flags, so either script can import it.
"""

import importlib
import pathlib
import subprocess
import sys

#: The repository this file lives in, the package's name, and the name a revision's copy is imported under.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "rail_interview"
OLD_PACKAGE = "rail_interview_at_rev"


def import_revision(rev: str, directory: str):
    """Extracts the package at ``rev`` into ``directory`` under another name and imports it.

    Args:
        rev: a git revision of this repository.
        directory: an empty directory that outlives the import.

    Returns:
        The revision's ``stat_tracking`` module.
    """
    archive = subprocess.run(["git", "archive", rev, PACKAGE], cwd=REPO_ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    root = pathlib.Path(directory) / PACKAGE
    for path in root.rglob("*.py"):  # absolute imports must resolve to the extracted copy
        path.write_text(path.read_text().replace(PACKAGE, OLD_PACKAGE))
    root.rename(pathlib.Path(directory) / OLD_PACKAGE)
    sys.path.insert(0, directory)
    return importlib.import_module(f"{OLD_PACKAGE}.stat_tracking")
