"""Imports a trainer package for the integration tests: skip where it is missing, fail under CI.

A user who installed only ``.[test]`` sees the TRL and verl tests skip with
the install command in the reason. ``.ci/run`` sets
``RAIL_INTERVIEW_REQUIRE_INTEGRATIONS=1``, under which a missing package is
an error instead, so that CI can never pass with those tests skipped.
"""

import importlib
import os
from types import ModuleType

import pytest

#: The environment variable under which a missing trainer package fails the tests.
REQUIRE_VARIABLE = "RAIL_INTERVIEW_REQUIRE_INTEGRATIONS"


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module``, or skips the calling test module (fails under CI) if it is missing.

    Args:
        module: the dotted module name, such as ``"trl"``.
        extra: the setup.py extra that installs it, named in the skip reason.

    Returns:
        The imported module.
    """
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f'{module} is not installed: pip install -e ".[{extra}]"')
