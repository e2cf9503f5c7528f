"""The trainer's hooks. Callbacks decide, the trainer acts: every hook does nothing by default."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The stop_reason of a run stopped after an epoch to be continued later (a sweep's trial at its rung): it ends
# like any stop at an epoch end (checkpoint, weights, card, metrics), but a resume from its checkpoint goes on
# training as if it had never stopped.
PAUSED = "paused"


class StopTraining(Exception):
    """Raised by a callback to end training at once, not as a failure (``reason``: 'cancelled', 'preempted').

    No final weights are written. With ``checkpoint=True`` the trainer first saves a checkpoint of the
    batch it stopped at, so a resume loses no work (graceful preemption).
    """

    def __init__(self, reason: str, checkpoint: bool = False):
        self.reason = reason
        self.checkpoint = checkpoint
        super().__init__(reason)


class TrainingFailed(Exception):
    """Training can't go on (a NaN loss, a run time limit); the message says why for the user."""


@dataclass(frozen=True)
class Best:
    """The best epoch so far by the monitored metric (early stopping's, else val_loss or loss)."""

    metric: str
    value: float
    epoch: int  # 1-based


@dataclass
class RunState:
    """What callbacks may read about the run in progress; the trainer keeps it current."""

    epochs: int
    epoch: int = 0  # the last completed epoch (1-based); 0 before the first
    batch: int = 0  # batches done in the current epoch
    batches_per_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    model: Any = None  # the nn.Module being trained
    stop_reason: str | None = None  # set by a callback at epoch end to stop after this epoch
    best: Best | None = None  # None until an epoch has ended
    elapsed_seconds: float = 0.0  # training time across all attempts of the run, as of the last batch or epoch end
    # (epoch, batch) of every checkpoint the run keeps, in this folder or stored by an earlier attempt.
    checkpoints: list[tuple[int, int]] = field(default_factory=list)


class Callback:
    """Base class: override the hooks you need."""

    def on_train_begin(self, state: RunState) -> None:
        """Before the first epoch of this run (also after a resume); set state.stop_reason to train no epoch."""

    def on_batch_end(self, state: RunState) -> None:
        """After each batch (its optimizer step, unless it is inside an accumulation group); raise StopTraining
        to stop at this batch boundary (a checkpoint then holds the group's gradient not yet applied)."""

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        """After each epoch with its metrics row (``epoch`` is 1-based); set state.stop_reason to stop."""

    def on_checkpoint(self, state: RunState, path: Path, epoch: int) -> None:
        """After a checkpoint file was written completely."""

    def on_checkpoint_removed(self, state: RunState, path: Path, epoch: int) -> None:
        """After the checkpoint policy dropped a checkpoint (keep_last, or a superseded mid-epoch one).

        ``path`` is where it was written; the file is gone from this folder, or was never in it (an
        earlier attempt's checkpoint, stored elsewhere), so a callback removes its own copy by name.
        """

    def on_epoch_done(self, state: RunState) -> None:
        """After all of an epoch's end: its on_epoch_end, its checkpoint (if one is due) and the pruning."""

    def on_train_end(self, state: RunState, result: Any) -> None:
        """After training ended and the outputs were written (result: TrainResult)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of this callback; saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
