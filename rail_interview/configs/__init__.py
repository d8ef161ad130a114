"""ml_collections config files for ``scripts/train.py``.

Each module defines ``get_config()``; pass its path with ``--config=``.
"""

import pathlib

#: Path of the default config file, the one ``scripts/train.py`` uses unless
#: told otherwise.
DEFAULT_CONFIG_PATH = str(pathlib.Path(__file__).with_name("default.py"))
