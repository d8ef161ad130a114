"""Keeps the doctest collection of the package from importing trainers that are not installed.

``pytest`` collects every module of the package for its docstring examples
(``pytest.ini``). The integration modules import TRL or verl at the top, so
they, and the TRL example's task (``studies/tiny_lm.py``), are left out where
that package is missing; ``tests/test_*_integration.py``
then say why they skip (or fail, under CI: see ``tests/integration_imports.py``).
"""

import importlib.util

collect_ignore = [f"integrations/{name}.py" for name in ("trl", "verl") if importlib.util.find_spec(name) is None]
if importlib.util.find_spec("trl") is None:
    collect_ignore.append("studies/tiny_lm.py")
