"""Training checkpoints: written atomically, read back as data only.

A checkpoint is a dict of tensors, numbers, strings and lists saved with
``torch.save``. ``save_checkpoint`` writes it to a temporary file and renames
it over the previous one, so a kill mid-write leaves the previous checkpoint
intact. ``load_checkpoint`` uses ``torch.load(..., weights_only=True)``: it
rebuilds tensors and plain containers and refuses anything else, so opening
a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Sequence

import torch

#: Bumped when the layout of the checkpoint dict changes.
CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """Raised for a checkpoint that is missing, corrupt or does not fit the run."""


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically (temporary file, flush, rename).

    Args:
        path: the checkpoint file.
        payload: tensors, numbers, strings, lists and dicts of those.
    """
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str, required: Sequence[str]) -> Dict[str, Any]:
    """Reads a checkpoint as data, checking its format and keys.

    Args:
        path: the checkpoint file.
        required: keys it must hold.

    Returns:
        The payload, tensors on the CPU.

    Raises:
        CheckpointError: if it is missing, unreadable, not data-only, of
            another format or lacks a key.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: is this the run directory that train.py printed?")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} is corrupt or not plain data: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a rail_interview checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return payload
