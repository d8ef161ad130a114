"""ml_collections config files for ``scripts/train.py``.

Each module defines ``get_config()``; pass its path with ``--config=``.
"""

import pathlib
from typing import Any, Mapping

import ml_collections

#: Path of the default config file, the one ``scripts/train.py`` uses unless
#: told otherwise.
DEFAULT_CONFIG_PATH = str(pathlib.Path(__file__).with_name("default.py"))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Returns a copy of ``config`` with dotted-path overrides applied.

    Args:
        config: the base config; not modified.
        overrides: for example ``{"stat_tracking.method": "batch", "seed": 3}``.

    Returns:
        The new config.

    Raises:
        KeyError: if a path does not exist in the config.
    """
    config = config.copy_and_resolve_references()  # keeps the field order of config.json
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {path!r}")
        node[leaf] = value
    return config
