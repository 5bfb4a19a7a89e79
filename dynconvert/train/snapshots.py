"""Fine-tuning checkpoints: periodic snapshots a run resumes from (``finetune --resume``).

Read weights-only: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import DynError, first_line
from ..io.fileio import atomic_path


def state_digest(params: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DynError(f"--resume: no checkpoint at {path}; run without --resume to start from the beginning")
    try:  # weights_only: a checkpoint never runs code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DynError(f"--resume: {path} is not a readable checkpoint ({first_line(e, 160)}); delete it to start over") from None
