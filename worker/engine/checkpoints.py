"""Checkpoint files: written atomically, found newest-first, pruned to the last k and the best."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
# epoch-0003.pt: after epoch 3; epoch-0003-batch-000120.pt: 120 batches into epoch 4 (a preemption).
_NAME = re.compile(r"^epoch-(\d+)(?:-batch-(\d+))?\.pt$")


def checkpoint_path(directory: Path, epoch: int, batch: int = 0) -> Path:
    suffix = f"-batch-{batch:06d}" if batch else ""
    return directory / f"epoch-{epoch:04d}{suffix}.pt"


def position(name: str) -> tuple[int, int] | None:
    """(completed epochs, batches into the next epoch) of a checkpoint file name, or None."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def save_atomically(obj: dict[str, Any], path: Path, durable: bool = True) -> None:
    """Write to a temporary file, then rename: a reader sees the whole file or none. ``durable``: fsync the
    file before the rename and the folder after it, so that the file outlasts a crash of the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(obj, handle)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def list_all(directory: Path) -> list[tuple[tuple[int, int], Path]]:
    """((epoch, batch), path) of every complete checkpoint, mid-epoch ones included, oldest first."""
    if not directory.is_dir():
        return []
    found = [(pos, p) for p in directory.iterdir() if (pos := position(p.name)) is not None]
    return sorted(found)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load one of our own checkpoints, tensors only (weights_only=True: nothing is unpickled)."""
    return torch.load(path, map_location=device, weights_only=True)


def load_newest(directory: Path, device: torch.device) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged one is skipped for the one before it."""
    for _position, path in reversed(list_all(directory)):
        try:
            return load_checkpoint(path, device)
        except Exception as exc:  # a torn or foreign file fails in many ways; all mean "not usable"
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(exc).__name__, exc)
    return None


def to_remove(positions: list[tuple[int, int]], keep_last: int, best_epoch: int | None) -> list[tuple[int, int]]:
    """Which checkpoints, by (epoch, batch), a run no longer needs: every mid-epoch one (the end of an epoch
    supersedes it) and every end-of-epoch one but the newest ``keep_last`` and the best epoch's."""
    whole = sorted(epoch for epoch, batch in positions if not batch)
    keep = set(whole[-keep_last:])
    if best_epoch is not None:
        keep.add(best_epoch)
    return [(epoch, batch) for epoch, batch in positions if batch or epoch not in keep]
