"""The training loop: in-memory batches, per-epoch metrics, callbacks, checkpoints and exact resume."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.spec import JobSpec
from worker.engine import checkpoints
from worker.engine.callbacks import Callback, RunState, StopTraining, TrainingFailed
from worker.engine.components import BATCH_SCHEDULERS, make_loss, make_optimizer, make_scheduler
from worker.engine.data import TensorData
from worker.engine.early_stopping import EarlyStopping

CHECKPOINT_FORMAT = 1


def best_tracker(spec: JobSpec) -> EarlyStopping:
    """Tracks the best epoch (for keeping its checkpoint) with early stopping's improvement rule."""
    if spec.early_stopping is not None:
        monitor, mode = spec.early_stopping.monitor, spec.early_stopping.mode
    else:
        monitor, mode = ("val_loss" if spec.has_validation else "loss"), "min"
    return EarlyStopping(monitor=monitor, mode=mode, stops_training=False)


class Trainer:
    """Runs epochs over tensors already on the device; callbacks decide, the trainer acts."""

    def __init__(self, spec: JobSpec, model: nn.Module, data: TensorData, device: torch.device,
                 checkpoint_dir: Path, callbacks: Sequence[Callback] = (), elapsed_seconds: float = 0.0):
        self.spec = spec
        self.model = model.to(device)
        self.data = data
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.batch_size = min(spec.training.batch_size, data.n_train)
        self.steps_per_epoch = math.ceil(data.n_train / self.batch_size)
        self.loss_fn = make_loss(spec, device)
        self.optimizer = make_optimizer(spec, self.model)
        self.scheduler = make_scheduler(spec, self.optimizer, self.steps_per_epoch)
        self.shuffle_generator = torch.Generator().manual_seed(spec.seed)
        self.early_stopping = EarlyStopping(**spec.early_stopping.model_dump()) if spec.early_stopping else None
        # With early stopping, its best epoch is the best one (the weights it restores); one rule for both.
        self.best = self.early_stopping or best_tracker(spec)
        # Our own callbacks run first, so user callbacks see their decisions.
        self.internal = {"best": self.best}
        self.callbacks = [*self.internal.values(), *callbacks]
        self.state = RunState(epochs=spec.training.epochs, batches_per_epoch=self.steps_per_epoch,
                              device=str(device), model=self.model)
        self.elapsed_before = elapsed_seconds
        self.started = time.monotonic()
        self.runtime_limit = spec.training.max_runtime_seconds
        # The epoch in progress, for a mid-epoch checkpoint: the shuffle state it started from and
        # the per-batch results so far.
        self.order_state = self.shuffle_generator.get_state()
        self.outputs: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.resume_batch = 0

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until the last epoch, a stop decision, StopTraining or TrainingFailed."""
        for callback in self.callbacks:
            callback.on_train_begin(self.state)
        try:
            while self.state.epoch < self.spec.training.epochs and self.state.stop_reason is None:
                metrics = self.run_epoch(self.state.epoch + 1)
                self.end_epoch(metrics)
        except StopTraining as stop:
            if stop.checkpoint and self.state.batch > 0:
                self.save_checkpoint(mid_epoch=True)
            raise

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data, then evaluation; returns the epoch's metrics row."""
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        if self.resume_batch:  # continuing a preempted epoch: the same order, the batches not yet done
            self.shuffle_generator.set_state(self.order_state)
        else:
            self.order_state = self.shuffle_generator.get_state()
            self.outputs, self.losses = [], []
        x, y = self.shuffled()
        outputs, losses = self.outputs, self.losses
        self.state.batch, self.resume_batch = self.resume_batch, 0
        for start in range(self.state.batch * self.batch_size, self.data.n_train, self.batch_size):
            xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
            out = self.model(xb)
            loss = self.loss_fn(out, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None and self.spec.scheduler.type in BATCH_SCHEDULERS:
                self.scheduler.step()
            # Keep results on the device; reading them every batch would force a sync.
            outputs.append(out.detach())
            losses.append(loss.detach())
            self.state.batch += 1
            self.check_runtime()
            for callback in self.callbacks:
                callback.on_batch_end(self.state)
        metrics = {"epoch": epoch, **self.train_metrics(torch.cat(outputs), y, torch.stack(losses))}
        if self.data.n_val:
            metrics.update({f"val_{k}": v for k, v in self.evaluate(self.data.x_val, self.data.y_val).items()})
        seconds = time.perf_counter() - started
        metrics.update(lr=lr, epoch_seconds=seconds, samples_per_second=self.data.n_train / seconds)
        if not math.isfinite(metrics["loss"]):
            raise TrainingFailed(f"loss became {metrics['loss']} at epoch {epoch}; lower the learning rate "
                                 "or standardize the data")
        return metrics

    def shuffled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training data in this epoch's order: one gather, then every batch is a cheap slice."""
        if not self.spec.training.shuffle:
            return self.data.x_train, self.data.y_train
        order = torch.randperm(self.data.n_train, generator=self.shuffle_generator).to(self.device)
        return self.data.x_train[order], self.data.y_train[order]

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Record the epoch, let callbacks decide, checkpoint, then act on a stop decision."""
        self.state.epoch = metrics["epoch"]
        self.state.history.append(metrics)
        for callback in self.callbacks:
            callback.on_epoch_end(self.state, metrics)
        last = self.state.epoch == self.spec.training.epochs or self.state.stop_reason is not None
        if self.scheduler is not None:
            self.step_scheduler(metrics)
        if self.state.epoch % self.spec.checkpoint.every_n_epochs == 0 or last:
            self.save_checkpoint()

    def step_scheduler(self, metrics: dict[str, Any]) -> None:
        kind = self.spec.scheduler.type
        if kind == "ReduceLROnPlateau":
            self.scheduler.step(metrics[self.spec.scheduler.monitor])
        elif kind not in BATCH_SCHEDULERS:
            self.scheduler.step()

    def check_runtime(self) -> None:
        if self.runtime_limit and self.elapsed() > self.runtime_limit:
            raise TrainingFailed(f"timed out after {self.runtime_limit} s (training.max_runtime_seconds)")

    def elapsed(self) -> float:
        """Seconds of training across all attempts of this run."""
        return self.elapsed_before + time.monotonic() - self.started

    # --- metrics --------------------------------------------------------------------------------

    def train_metrics(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> dict:
        """Loss as the mean over samples of the batch losses (as Keras reports it), and task metrics."""
        sizes = torch.full((len(losses),), float(self.batch_size), device=losses.device)
        sizes[-1] = self.data.n_train - self.batch_size * (len(losses) - 1)
        loss = (losses * sizes).sum() / self.data.n_train
        return {"loss": loss.item(), **self.task_metrics(outputs, targets)}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Loss and task metrics of the model in eval mode over a whole split."""
        self.model.eval()
        chunk = max(self.batch_size, 4096)
        outputs = torch.cat([self.model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        self.model.train()
        return {"loss": self.loss_fn(outputs, y).item(), **self.task_metrics(outputs, y)}

    def task_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Accuracy for classification; MAE and R² for regression."""
        outputs = outputs.detach()
        if self.spec.task == "multiclass":
            return {"accuracy": (outputs.argmax(dim=1) == targets).float().mean().item()}
        if self.spec.task == "binary":
            threshold = 0.5 if self.spec.loss_type == "BCELoss" else 0.0  # probabilities or logits
            return {"accuracy": ((outputs > threshold) == (targets > 0.5)).float().mean().item()}
        residual = outputs - targets
        total = ((targets - targets.mean(dim=0)) ** 2).sum()
        r2 = 1 - (residual**2).sum() / total if total > 0 else torch.tensor(float("nan"))
        return {"mae": residual.abs().mean().item(), "r2": r2.item()}

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly where this epoch ended."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.state.epoch,
            "stop_reason": self.state.stop_reason,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "callbacks": {name: cb.state_dict() for name, cb in self.internal.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "shuffle": self.shuffle_generator.get_state(),
            },
            "history": self.state.history,
            "elapsed_seconds": self.elapsed(),
            "partial": None,
        }

    def save_checkpoint(self, mid_epoch: bool = False) -> None:
        """Save the state after this epoch (or, mid_epoch, after this batch); prune old checkpoints."""
        state = self.checkpoint_state()
        if mid_epoch:
            state["partial"] = {"batch": self.state.batch, "order_state": self.order_state,
                                "outputs": self.outputs, "losses": self.losses}
        path = checkpoints.checkpoint_path(self.checkpoint_dir, self.state.epoch,
                                           self.state.batch if mid_epoch else 0)
        checkpoints.save_atomically(state, path)
        for callback in self.callbacks:
            callback.on_checkpoint(self.state, path, self.state.epoch)
        if not mid_epoch:
            self.prune_checkpoints()

    def prune_checkpoints(self) -> None:
        """Keep the last k end-of-epoch checkpoints and the best; mid-epoch ones are superseded."""
        every = checkpoints.list_all(self.checkpoint_dir)
        stale = [(epoch, path) for (epoch, batch), path in every if batch]
        whole = dict((epoch, path) for (epoch, batch), path in every if not batch)
        best_epoch = self.best.best_epoch + 1 if self.state.history else None
        stale += [(epoch, whole[epoch])
                  for epoch in checkpoints.to_prune(list(whole), self.spec.checkpoint.keep_last, best_epoch)]
        for epoch, path in stale:
            path.unlink(missing_ok=True)
            for callback in self.callbacks:
                callback.on_checkpoint_removed(self.state, path, epoch)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by checkpoint_state()."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name, callback_state in state["callbacks"].items():
            self.internal[name].load_state_dict(callback_state)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.shuffle_generator.set_state(state["rng"]["shuffle"].cpu())
        self.state.epoch = state["epoch"]
        self.state.history = list(state["history"])
        self.state.stop_reason = state["stop_reason"]
        self.elapsed_before = state["elapsed_seconds"]
        self.started = time.monotonic()
        partial = state.get("partial")
        if partial:
            self.resume_batch = partial["batch"]
            self.order_state = partial["order_state"].cpu()
            self.outputs, self.losses = list(partial["outputs"]), list(partial["losses"])


__all__ = ["Trainer", "StopTraining", "TrainingFailed"]
