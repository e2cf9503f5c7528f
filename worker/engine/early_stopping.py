"""Early stopping with Keras' rules (monitor, mode, min_delta, patience, baseline, restore, start epoch)."""

from __future__ import annotations

import math
from typing import Any

from models.spec import higher_is_better
from worker.engine.callbacks import Callback, RunState


class EarlyStopping(Callback):
    """Decides when to stop; the trainer acts. ``decide()`` is pure bookkeeping over a metric sequence."""

    def __init__(self, monitor="val_loss", mode="auto", min_delta=0.0, patience=0, baseline=None,
                 restore_best_weights=False, start_from_epoch=0, stops_training=True):
        self.monitor = monitor
        self.stops_training = stops_training  # False: only track the best epoch (for checkpoints)
        self.maximize = higher_is_better(monitor, mode)
        self.min_delta = abs(min_delta) if self.maximize else -abs(min_delta)
        self.patience = patience
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.wait = 0
        self.best = -math.inf if self.maximize else math.inf
        self.best_epoch = 0  # 0-based, as in Keras
        self.stopped_epoch = 0
        self.best_weights: dict[str, Any] | None = None

    def is_improvement(self, value: float, reference: float) -> bool:
        """The one rule for 'better', shared by stopping and best-checkpoint tracking."""
        shifted = value - self.min_delta
        return shifted > reference if self.maximize else shifted < reference

    def decide(self, epoch: int, value: float) -> tuple[bool, bool]:
        """Record ``value`` at 0-based ``epoch``; return (is_new_best, should_stop)."""
        if epoch < self.start_from_epoch:
            return False, False
        self.wait += 1
        if self.is_improvement(value, self.best):
            self.best, self.best_epoch = value, epoch
            if self.baseline is None or self.is_improvement(value, self.baseline):
                self.wait = 0
            return True, False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return False, True
        return False, False

    def state_dict(self) -> dict[str, Any]:
        state = {key: getattr(self, key) for key in ("wait", "best", "best_epoch", "stopped_epoch")}
        state["best_weights"] = self.best_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        """Track the monitored metric; snapshot the best weights; ask the trainer to stop."""
        epoch = metrics["epoch"] - 1
        first_eligible = self.best_weights is None and epoch >= self.start_from_epoch
        improved, stop = self.decide(epoch, metrics[self.monitor])
        if self.restore_best_weights and (improved or first_eligible):
            self.best_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        if stop and self.stops_training:
            state.stop_reason = "early_stopping"

    def restore(self, model) -> bool:
        """Load the best weights into ``model`` if asked to; return whether it did."""
        if self.restore_best_weights and self.best_weights is not None:
            model.load_state_dict(self.best_weights)
            return True
        return False
