"""``train()``: one spec, one output folder; the engine's whole public entry point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from models.spec import JobSpec, Limits, Problem, SpecError
from worker.engine import checkpoints, distributed, outputs
from worker.engine.callbacks import Callback, StopTraining, TrainingFailed
from worker.engine.components import implementation
from worker.engine.data import load_arrays, prepare
from worker.engine.device import pick_device, seed, thread_share
from worker.engine.group import Single, init_group
from worker.engine.network import build_network, plan_network
from worker.engine.trainer import Trainer


@dataclass
class TrainResult:
    """How a run ended. ``status``: succeeded, failed (see ``error``) or stopped (see ``stop_reason``)."""

    status: str
    stop_reason: str | None = None
    error: str | None = None
    epochs_completed: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    device: str = "cpu"
    total_parameters: int = 0
    compile_seconds: float | None = None  # training.compile: seconds spent compiling, across attempts

    @property
    def weights_path(self) -> Path:
        return self.out_dir / outputs.WEIGHTS

    @property
    def card_path(self) -> Path:
        return self.out_dir / outputs.CARD

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / outputs.METRICS


@dataclass
class Prepared:
    """A run set up and ready to fit: what the CLI shows before training starts."""

    trainer: Trainer
    plan: Any
    data: Any
    resumed_from: int | None


def prepare_run(spec: JobSpec, out_dir: Path, *, resume: bool = False, callbacks: Sequence[Callback] = (),
                data_path: Path | None = None, device: str | None = None,
                limits: Limits | None = None, group=None, durable_checkpoints: bool = True) -> Prepared:
    """Load the data, check the network against it, build everything, and restore a checkpoint if resuming.

    ``group`` is this process's place in a data-parallel run (worker.engine.group); rank 0 or a
    single process owns the output folder and the callbacks.
    """
    limits = limits or Limits()
    out_dir.mkdir(parents=True, exist_ok=True)
    group = group or Single()
    torch_device = pick_device(device or spec.resources.device, group.rank)
    arrays = load_arrays(spec, data_path)
    if len(arrays.X) > limits.max_samples:
        raise SpecError([Problem("data", f"{len(arrays.X)} samples exceed the limit of {limits.max_samples} "
                                         "(max_samples)")])
    data = prepare(spec, arrays, torch_device)
    plan = plan_network(spec, data.report.input_shape, data.report.n_outputs, limits)
    seed(spec.seed, torch_device)  # fixed initial weights for a fixed seed
    model = build_network(spec, plan, data.mean, data.std)
    if group.rank:
        seed(spec.seed + group.rank, torch_device)  # each rank its own dropout masks
    checkpoint_dir = out_dir / outputs.CHECKPOINTS
    state = checkpoints.load_newest(checkpoint_dir, torch_device) if resume else None
    if not resume and group.is_main:  # a fresh run must not pick up a previous run's files
        for _position, path in checkpoints.list_all(checkpoint_dir):
            path.unlink()
    callbacks = [outputs.MetricsFile(out_dir / outputs.METRICS), *callbacks] if group.is_main else []
    trainer = Trainer(spec, model, data, torch_device, checkpoint_dir, callbacks, group, limits=limits,
                      durable_checkpoints=durable_checkpoints)
    if state is not None:
        trainer.restore(state)
    return Prepared(trainer, plan, data, state["epoch"] if state else None)


def finish(prepared: Prepared, spec: JobSpec, out_dir: Path) -> TrainResult:
    """Run the loop and write the outputs; map how it ended onto a TrainResult."""
    trainer = prepared.trainer
    result = TrainResult(status="succeeded", out_dir=out_dir, device=str(trainer.device),
                         total_parameters=prepared.plan.total_parameters)
    try:
        trainer.fit()
        result.stop_reason = trainer.state.stop_reason or "completed"
    except StopTraining as stop:
        result.status, result.stop_reason = "stopped", stop.reason
    except TrainingFailed as failure:
        result.status, result.error = "failed", str(failure)
    history = trainer.state.history
    result.epochs_completed = trainer.state.epoch
    if spec.training.compile:
        result.compile_seconds = round(trainer.compile_seconds, 3)
    result.final_metrics = history[-1] if history else {}
    if trainer.state.best is not None:
        best = trainer.state.best
        result.best_metric, result.best_value, result.best_epoch = best.metric, best.value, best.epoch
    if result.status == "succeeded" and trainer.dist.is_main:
        write_outputs(trainer, prepared, spec, out_dir, result)
    for callback in trainer.callbacks:
        callback.on_train_end(trainer.state, result)
    return result


def write_outputs(trainer: Trainer, prepared: Prepared, spec: JobSpec, out_dir: Path, result: TrainResult):
    """The weights and the model card of a run that succeeded (metrics.jsonl is MetricsFile's alone)."""
    restored = trainer.early_stopping.restore(trainer.module) if trainer.early_stopping else False
    outputs.save_weights(trainer.module, out_dir / outputs.WEIGHTS)
    summary = {
        "stop_reason": result.stop_reason,
        "epochs_completed": result.epochs_completed,
        "final_metrics": result.final_metrics,
        "best": {"metric": result.best_metric, "value": result.best_value, "epoch": result.best_epoch},
        "restored_best_weights": restored,
        "standardize": spec.data.standardize,
        "device": result.device,
        "optimizer_implementation": implementation(trainer.optimizer),  # fused, foreach or for-loop kernels
        # training.compile: seconds of the steps that compiled (each attempt compiles anew), else None
        "compile_seconds": result.compile_seconds,
        # What predictions mean: class index i is classes[i] (labels as in the data); the columns, in order.
        "classes": prepared.data.classes,
        "features": prepared.data.feature_names,
    }
    report = prepared.data.report
    card = outputs.model_card(spec, prepared.plan, report.input_shape, report.n_outputs, summary)
    outputs.write_card(card, out_dir / outputs.CARD)


def train(spec: JobSpec, out_dir: Path, *, resume: bool = False, callbacks: Sequence[Callback] = (),
          data_path: Path | None = None, device: str | None = None, limits: Limits | None = None,
          durable_checkpoints: bool = True) -> TrainResult:
    """Train ``spec`` into ``out_dir`` (weights.safetensors, model.json, metrics.jsonl, checkpoints/).

    Raises SpecError when the data or network don't fit; any exception a callback raises other than
    StopTraining passes through untouched. ``durable_checkpoints=False`` doesn't fsync the checkpoint files:
    for a caller that keeps its own durable copy of each one (the worker: the artifact store).
    """
    out_dir, limits = Path(out_dir), limits or Limits()
    if spec.resources.world_size > 1:
        return train_distributed(spec, out_dir, resume=resume, callbacks=callbacks, data_path=data_path,
                                 device=device, limits=limits, durable_checkpoints=durable_checkpoints)
    prepared = prepare_run(spec, out_dir, resume=resume, callbacks=callbacks, data_path=data_path,
                           device=device, limits=limits, durable_checkpoints=durable_checkpoints)
    return finish(prepared, spec, out_dir)


def train_distributed(spec: JobSpec, out_dir: Path, *, resume: bool, callbacks: Sequence[Callback],
                      data_path: Path | None, device: str | None, limits: Limits,
                      durable_checkpoints: bool) -> TrainResult:
    """Data-parallel training: this process is rank 0, the other ranks are subprocesses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    world_size, port = spec.resources.world_size, distributed.free_port()
    device_type = pick_device(device or spec.resources.device).type
    own_threads = torch.get_num_threads()  # a worker slot's share of the cores (worker.cpus), or all of them
    threads = thread_share(own_threads, world_size)
    ranks = distributed.start_ranks(spec, limits, out_dir, world_size, port, resume, data_path, device_type, threads)
    try:
        group = init_group(0, world_size, port, device_type, threads)
        try:
            prepared = prepare_run(spec, out_dir, resume=resume, callbacks=callbacks, data_path=data_path,
                                   device=device_type, limits=limits, group=group,
                                   durable_checkpoints=durable_checkpoints)
            return finish(prepared, spec, out_dir)
        finally:
            torch_dist.destroy_process_group()
    finally:
        distributed.stop_ranks(ranks)
        torch.set_num_threads(own_threads)  # a worker's pool process runs its next job with its slot's share
