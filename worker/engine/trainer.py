"""The training loop: in-memory batches, per-epoch metrics, callbacks, checkpoints and exact resume."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.shapes import EVAL_CHUNK, optimizer_steps
from models.spec import JobSpec, Limits
from worker.engine import checkpoints
from worker.engine.callbacks import PAUSED, Best, Callback, RunState, StopTraining, TrainingFailed
from worker.engine.compiling import ForwardLoss
from worker.engine.components import BATCH_SCHEDULERS, make_loss, make_optimizer, make_scheduler
from worker.engine.data import TensorData
from worker.engine.early_stopping import EarlyStopping
from worker.engine.group import Single
from worker.engine.precision import Precision

CHECKPOINT_FORMAT = 1


def best_tracker(spec: JobSpec) -> EarlyStopping:
    """Tracks the best epoch (for keeping its checkpoint) with early stopping's improvement rule."""
    if spec.early_stopping is not None:
        monitor, mode = spec.early_stopping.monitor, spec.early_stopping.mode
    else:
        monitor, mode = ("val_loss" if spec.has_validation else "loss"), "min"
    return EarlyStopping(monitor=monitor, mode=mode, stops_training=False)


def runtime_limit(spec: JobSpec, limits: Limits) -> int:
    """Seconds of training a run may take: the spec's training.max_runtime_seconds, at most the deployment's."""
    return min(spec.training.max_runtime_seconds or limits.max_runtime_seconds, limits.max_runtime_seconds)


class Trainer:
    """Runs epochs over tensors already on the device; callbacks decide, the trainer acts."""

    def __init__(self, spec: JobSpec, model: nn.Module, data: TensorData, device: torch.device,
                 checkpoint_dir: Path, callbacks: Sequence[Callback] = (), group=None,
                 limits: Limits | None = None, durable_checkpoints: bool = True):
        self.spec = spec
        self.dist = group or Single()
        self.module = model.to(device)  # what checkpoints and weights hold
        self.model = self.dist.wrap(self.module, device)  # what trains (DistributedDataParallel if n > 1)
        self.data = data
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.durable_checkpoints = durable_checkpoints  # fsync each one (checkpoints.save_atomically)
        self.batch_size = min(spec.training.batch_size, data.n_train)
        self.n_used = data.n_train
        if data.n_train % self.batch_size and data.n_train % self.batch_size < self.dist.world_size:
            self.n_used -= data.n_train % self.batch_size  # a last batch too small to share is dropped
        self.steps_per_epoch = math.ceil(self.n_used / self.batch_size)  # batches
        self.accumulate = spec.training.accumulate_batches
        self.precision = Precision(spec.training.precision, device)
        self.loss_fn = make_loss(spec, device)
        self.forward_loss = ForwardLoss(self.model, self.precision, self.loss_fn, spec.training.compile)
        self.compile_seconds = 0.0  # training.compile: the first step of each batch shape, across attempts
        self.optimizer = make_optimizer(spec, self.module, device)
        self.scheduler = make_scheduler(spec, self.optimizer, optimizer_steps(self.steps_per_epoch, self.accumulate))
        self.shuffle_generator = torch.Generator().manual_seed(spec.seed)
        self.early_stopping = EarlyStopping(**spec.early_stopping.model_dump()) if spec.early_stopping else None
        # With early stopping, its best epoch is the best one (the weights it restores); one rule for both.
        # The trainer runs it before the callbacks, which read its decisions in the state.
        self.best = self.early_stopping or best_tracker(spec)
        self.internal = {"best": self.best}  # what checkpoints hold of the trainer's own callbacks
        self.callbacks = list(callbacks)
        self.state = RunState(epochs=spec.training.epochs, batches_per_epoch=self.steps_per_epoch,
                              device=str(device), model=self.module)
        self.elapsed_before = 0.0
        self.started = time.monotonic()
        self.runtime_limit = runtime_limit(spec, limits or Limits())
        # The epoch in progress, for a mid-epoch checkpoint: the shuffle state it started from and
        # the per-batch results so far.
        self.order_state = self.shuffle_generator.get_state()
        self.outputs: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.resume_batch = 0
        self.epoch_lr = 0.0  # the learning rate the epoch started with (its metrics row reports it)
        self.pending_gradient = False  # batches backpropagated since the last optimizer step

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until the last epoch, a stop decision, StopTraining or TrainingFailed."""
        for callback in self.callbacks:
            callback.on_train_begin(self.state)
        # The callbacks run on rank 0 alone: a stop they decide holds for every rank.
        self.state.stop_reason = self.dist.from_main(self.state.stop_reason)
        try:
            while self.state.epoch < self.spec.training.epochs and self.state.stop_reason is None:
                metrics = self.run_epoch(self.state.epoch + 1)
                self.end_epoch(metrics)
        except StopTraining as stop:
            # Mid-epoch checkpoints hold one process's batch results, so only a single process makes them.
            if stop.checkpoint and self.state.batch > 0 and self.dist.world_size == 1:
                self.save_checkpoint(mid_epoch=True)
            raise

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data, then evaluation; returns the epoch's metrics row."""
        started = time.perf_counter()
        self.model.train()
        if self.resume_batch:  # continuing a preempted epoch: the same order, the batches not yet done
            self.shuffle_generator.set_state(self.order_state)
        else:
            self.order_state = self.shuffle_generator.get_state()
            self.epoch_lr = self.optimizer.param_groups[0]["lr"]  # a per-batch scheduler moves it in the epoch
            self.outputs, self.losses, self.sizes = [], [], []
        x, y = self.shuffled()
        outputs, losses = self.outputs, self.losses
        self.state.batch, self.resume_batch = self.resume_batch, 0
        for start in range(self.state.batch * self.batch_size, self.n_used, self.batch_size):
            xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
            xb, yb = self.dist.shard(xb), self.dist.shard(yb)
            group_start, group_end = self.group_of(self.state.batch)
            compiles = self.forward_loss.compiles(xb)
            step_started = time.perf_counter() if compiles else 0.0
            out, loss = self.forward_loss(xb, yb)
            if self.state.batch == group_start:
                self.optimizer.zero_grad(set_to_none=True)
            share = self.group_share(start, group_start, group_end)
            self.precision.backward(loss if share == 1.0 else loss * share)
            self.pending_gradient = True
            if self.state.batch + 1 == group_end:
                self.optimizer_step()
            if compiles:  # its forward (and backward) compiled: that time, and this one step's work
                self.compile_seconds += time.perf_counter() - step_started
            # Keep results on the device; reading them every batch would force a sync.
            outputs.append(out.detach())
            losses.append(loss.detach())
            self.sizes.append(len(yb))
            self.state.batch += 1
            self.dist.agreed(self.batch_end)
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=self.device)
        loss_sum = (torch.stack(losses).double() * sizes).sum()
        metrics = {"epoch": epoch, **self.summarize(torch.cat(outputs), self.local_targets(y), loss_sum)}
        if self.data.n_val:
            metrics.update({f"val_{k}": v for k, v in self.evaluate(self.data.x_val, self.data.y_val).items()})
        seconds = time.perf_counter() - started
        metrics.update(lr=self.epoch_lr, epoch_seconds=seconds, samples_per_second=self.n_used / seconds)
        if not math.isfinite(metrics["loss"]):
            raise TrainingFailed(f"loss became {metrics['loss']} at epoch {epoch}; lower the learning rate "
                                 "or standardize the data")
        return metrics

    def group_of(self, batch: int) -> tuple[int, int]:
        """The accumulation group of a batch of this epoch: [first batch, last batch + 1). Groups start at each
        epoch's first batch; the last one ends with the epoch, shorter if the batches don't divide evenly."""
        first = batch - batch % self.accumulate
        return first, min(first + self.accumulate, self.steps_per_epoch)

    def group_share(self, start: int, group_start: int, group_end: int) -> float:
        """What a batch's mean loss weighs in its group's gradient: its share of the group's samples, so a
        group's gradient is that of one batch of all its samples (the batches of the whole group, across
        ranks). 1 without accumulation, and 1/k for k batches of one size."""
        if group_end - group_start == 1:
            return 1.0
        group_samples = min(group_end * self.batch_size, self.n_used) - group_start * self.batch_size
        return (min(start + self.batch_size, self.n_used) - start) / group_samples

    def optimizer_step(self) -> None:
        """Apply the group's gradient: unscale (float16), clip, step, then a per-batch scheduler's step."""
        clip = self.spec.training.gradient_clip_norm
        if clip is not None:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.precision.step(self.optimizer)
        self.pending_gradient = False
        if self.scheduler is not None and self.spec.scheduler.type in BATCH_SCHEDULERS:
            self.scheduler.step()

    def local_targets(self, y: torch.Tensor) -> torch.Tensor:
        """The targets this process trained on this epoch, in the order of its outputs."""
        if self.dist.world_size == 1:
            return y[:self.n_used]
        return torch.cat([self.dist.shard(y[i:i + self.batch_size]) for i in range(0, self.n_used, self.batch_size)])

    def batch_end(self) -> None:
        """The batch boundary: the run-time limit, then the callbacks (rank 0's only, under DDP)."""
        self.state.elapsed_seconds = self.elapsed()
        self.check_runtime()
        for callback in self.callbacks:
            callback.on_batch_end(self.state)

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
        self.state.elapsed_seconds = self.elapsed()
        self.best.on_epoch_end(self.state, metrics)
        self.publish_best()
        for callback in self.callbacks:
            callback.on_epoch_end(self.state, metrics)
        self.state.stop_reason = self.dist.from_main(self.state.stop_reason)
        last = self.state.epoch == self.spec.training.epochs or self.state.stop_reason is not None
        if self.scheduler is not None:
            self.step_scheduler(metrics)
        if self.state.epoch % self.spec.checkpoint.every_n_epochs == 0 or last:
            self.save_checkpoint()
        for callback in self.callbacks:
            callback.on_epoch_done(self.state)

    def step_scheduler(self, metrics: dict[str, Any]) -> None:
        kind = self.spec.scheduler.type
        if kind == "ReduceLROnPlateau":
            self.scheduler.step(metrics[self.spec.scheduler.monitor])
        elif kind not in BATCH_SCHEDULERS:
            self.scheduler.step()

    def publish_best(self) -> None:
        """Put the best epoch so far in the state, for the callbacks and the result."""
        if self.state.history:
            self.state.best = Best(self.best.monitor, self.best.best, self.best.best_epoch + 1)

    def check_runtime(self) -> None:
        """Fail the run once its training, across attempts, took longer than its limit."""
        if self.state.elapsed_seconds > self.runtime_limit:
            raise TrainingFailed(f"timed out after {self.runtime_limit} s of training (limit: "
                                 "training.max_runtime_seconds, at most the deployment's max_runtime_seconds)")

    def elapsed(self) -> float:
        """Seconds of training across all attempts of this run."""
        return self.elapsed_before + time.monotonic() - self.started

    # --- metrics --------------------------------------------------------------------------------

    def summarize(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor,
                  across_ranks: bool = True) -> dict[str, float]:
        """Loss (mean over samples, as Keras reports it) and task metrics, from sums over all ranks."""
        sums = torch.cat([loss_sum.double().reshape(1), self.task_sums(outputs.detach(), targets)])
        if across_ranks:
            sums = self.dist.all_sum(sums)
        return self.metrics_from(sums.tolist())

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Loss and task metrics of the model in eval mode over a whole split (each rank: all of it)."""
        self.dist.sync_buffers(self.module)
        self.module.eval()
        chunk = max(self.batch_size, EVAL_CHUNK)
        outputs = torch.cat([self.precision.forward(self.module, x[i:i + chunk]) for i in range(0, len(x), chunk)])
        self.module.train()
        return self.summarize(outputs, y, self.loss_fn(outputs, y) * len(y), across_ranks=False)

    def task_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sums that add up across batches and ranks: [n, correct] or [n, |e|, e², Σy, Σy² per target]."""
        n = torch.tensor([len(targets)], dtype=torch.float64, device=outputs.device)
        if self.spec.task == "multiclass":
            correct = (outputs.argmax(dim=1) == targets).sum()
        elif self.spec.task == "binary":
            threshold = 0.5 if self.spec.loss_type == "BCELoss" else 0.0  # probabilities or logits
            correct = ((outputs > threshold) == (targets > 0.5)).sum()
        else:
            residual, y = (outputs - targets).double(), targets.double()
            return torch.cat([n, residual.abs().sum().reshape(1), (residual**2).sum().reshape(1),
                              y.sum(dim=0), (y**2).sum(dim=0)]).cpu()
        return torch.cat([n, correct.double().reshape(1)]).cpu()

    def metrics_from(self, sums: list[float]) -> dict[str, float]:
        """Accuracy for classification; MAE and R² for regression."""
        loss_sum, n = sums[0], sums[1]
        if self.spec.task != "regression":
            return {"loss": loss_sum / n, "accuracy": sums[2] / n}
        abs_sum, squared_sum, k = sums[2], sums[3], (len(sums) - 4) // 2
        total = sum(y_sq - y_sum**2 / n for y_sum, y_sq in zip(sums[4:4 + k], sums[4 + k:], strict=True))
        r2 = 1 - squared_sum / total if total > 0 else float("nan")
        return {"loss": loss_sum / n, "mae": abs_sum / (n * k), "r2": r2}

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly where this epoch ended."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.state.epoch,
            "stop_reason": self.state.stop_reason,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
            "callbacks": {name: cb.state_dict() for name, cb in self.internal.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "shuffle": self.shuffle_generator.get_state(),
            },
            "history": self.state.history,
            "elapsed_seconds": self.elapsed(),
            "compile_seconds": self.compile_seconds,
            "checkpoints": list(self.state.checkpoints),
            "partial": None,
        }

    def save_checkpoint(self, mid_epoch: bool = False) -> None:
        """Save the state after this epoch (or, mid_epoch, after this batch); prune old checkpoints."""
        if not self.dist.is_main:
            return
        position = (self.state.epoch, self.state.batch if mid_epoch else 0)
        # Known before the save, and pruned after it: a kill in between leaves the ones still to prune in
        # the list this checkpoint holds, and the resumed run's next save prunes them.
        self.state.checkpoints = sorted({*self.state.checkpoints, position})
        state = self.checkpoint_state()
        if mid_epoch:
            state["partial"] = {"batch": self.state.batch, "order_state": self.order_state,
                                "outputs": self.outputs, "losses": self.losses, "sizes": self.sizes,
                                "lr": self.epoch_lr,
                                # Stopped inside an accumulation group: its gradient so far, not yet applied.
                                "gradient": self.gradient() if self.pending_gradient else None}
        path = checkpoints.checkpoint_path(self.checkpoint_dir, *position)
        checkpoints.save_atomically(state, path, durable=self.durable_checkpoints)
        for callback in self.callbacks:
            callback.on_checkpoint(self.state, path, self.state.epoch)
        if not mid_epoch:
            self.prune_checkpoints()

    def prune_checkpoints(self) -> None:
        """Keep the last k end-of-epoch checkpoints and the best; mid-epoch ones are superseded.

        Every checkpoint the run knows of is pruned, an earlier attempt's too: its file is not in this
        folder (a resume brings only the checkpoint it continues from), but the callbacks drop their copies.
        """
        best_epoch = self.state.best.epoch if self.state.best else None
        for epoch, batch in checkpoints.to_remove(self.state.checkpoints, self.spec.checkpoint.keep_last, best_epoch):
            self.state.checkpoints.remove((epoch, batch))
            path = checkpoints.checkpoint_path(self.checkpoint_dir, epoch, batch)
            path.unlink(missing_ok=True)
            for callback in self.callbacks:
                callback.on_checkpoint_removed(self.state, path, epoch)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by checkpoint_state()."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("precision", {}))
        for name, callback_state in state["callbacks"].items():
            self.internal[name].load_state_dict(callback_state)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.shuffle_generator.set_state(state["rng"]["shuffle"].cpu())
        self.state.epoch = state["epoch"]
        self.state.history = list(state["history"])
        # A pause is no end: the resumed run goes on (any other stop, e.g. early stopping, stays one).
        self.state.stop_reason = None if state["stop_reason"] == PAUSED else state["stop_reason"]
        self.publish_best()
        self.elapsed_before = self.state.elapsed_seconds = state["elapsed_seconds"]
        self.started = time.monotonic()
        self.compile_seconds = state.get("compile_seconds", 0.0)  # this attempt compiles again, and adds its own
        # A checkpoint written before the list was kept knows of no other; those stay until the job is deleted.
        self.state.checkpoints = [tuple(position) for position in state.get("checkpoints", [])]
        partial = state.get("partial")
        if partial:
            self.resume_batch = partial["batch"]
            self.order_state = partial["order_state"].cpu()
            self.outputs, self.losses = list(partial["outputs"]), list(partial["losses"])
            self.sizes = list(partial["sizes"])
            # Checkpoints from before "lr" was kept: the learning rate now (right unless it moves per batch).
            self.epoch_lr = partial.get("lr", self.optimizer.param_groups[0]["lr"])
            if partial.get("gradient") is not None:
                self.set_gradient(partial["gradient"])

    def gradient(self) -> list[torch.Tensor | None]:
        """The parameters' gradients, in parameter order (None where a parameter has none)."""
        return [None if p.grad is None else p.grad.detach().clone() for p in self.module.parameters()]

    def set_gradient(self, gradient: list[torch.Tensor | None]) -> None:
        """Put back what gradient() returned, so the group in progress goes on exactly."""
        self.pending_gradient = True
        for parameter, grad in zip(self.module.parameters(), gradient, strict=True):
            parameter.grad = None if grad is None else grad.to(parameter.device)


__all__ = ["Trainer", "StopTraining", "TrainingFailed"]
