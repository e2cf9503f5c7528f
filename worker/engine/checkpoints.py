"""Checkpoint files: written atomically, found newest-first, pruned to the last k and the best."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_NAME = re.compile(r"^epoch-(\d+)\.pt$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.pt"


def save_atomically(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete checkpoint, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load one of our own checkpoints, tensors only (weights_only=True: nothing is unpickled)."""
    return torch.load(path, map_location=device, weights_only=True)


def load_newest(directory: Path, device: torch.device) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged one is skipped for the one before it."""
    for _epoch, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, device)
        except Exception as exc:  # a torn or foreign file fails in many ways; all mean "not usable"
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(exc).__name__, exc)
    return None


def to_prune(epochs: list[int], keep_last: int, best_epoch: int | None) -> list[int]:
    """Which checkpoint epochs to delete: all but the newest ``keep_last`` and the best one."""
    keep = set(sorted(epochs)[-keep_last:])
    if best_epoch is not None:
        keep.add(best_epoch)
    return [epoch for epoch in epochs if epoch not in keep]
