"""ml_collections config files for ``scripts/train.py``.

Each module defines ``get_config()``; pass its path with ``--config=``.
"""

import pathlib
import sys
from typing import Any, Mapping

import ml_collections
from ml_collections import config_flags

#: Path of the default config file, the one ``scripts/train.py`` uses unless
#: told otherwise.
DEFAULT_CONFIG_PATH = str(pathlib.Path(__file__).with_name("default.py"))

#: Path of the pass/fail problem's config file, ``scripts/pass_fail_study.py``'s default.
PASS_FAIL_CONFIG_PATH = str(pathlib.Path(__file__).with_name("pass_fail.py"))


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


def define_config_flag(script: str, help_text: str, default_path: str = DEFAULT_CONFIG_PATH) -> Any:
    """Defines ``--config`` (a config file, locked) for a script, in one line on a mistyped field.

    ``config_flags`` applies the ``--config.*`` overrides of ``sys.argv``
    while it defines the flag, so a mistyped field fails here, with an
    ml_collections traceback whose message holds a literal newline. This
    ends the process with one line instead: ``<script>: error: no such
    config field: 'num_epoch' Did you mean "num_epochs" ...``.

    Args:
        script: the script's name, for the message.
        help_text: the flag's help.
        default_path: the config file used without ``--config=``;
            ``default.py`` unless given.

    Returns:
        The flag holder (its ``.value`` is the config).
    """
    try:
        return config_flags.DEFINE_config_file("config", default_path, help_text, lock_config=True)
    except (KeyError, AttributeError) as error:
        while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(message))
            error = error.args[0]
        message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
        sys.exit(f"{script}: error: no such config field: {' '.join(message.split())}")
