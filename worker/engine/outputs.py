"""What a run leaves in its output folder: weights, a model card and the metrics."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import sklearn
import torch
from torch import nn

from models.shapes import ShapeReport
from models.spec import JobSpec
from models.version import torchyard_version
from worker.engine.callbacks import Callback, RunState

WEIGHTS = "weights.safetensors"
CARD = "model.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CARD_FORMAT = "torchyard.model/1"


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state as safetensors (tensors only, loads without pickle)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(path, safetensors.torch.save(tensors))


class MetricsFile(Callback):
    """The one writer of metrics.jsonl, one JSON line an epoch, a line as each epoch ends (so the file can
    be followed during training).

    Training begins by writing the history in full: empty for a fresh run, and for a resumed one the
    epochs its checkpoint holds, replacing any line a killed attempt wrote after that checkpoint.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, state: RunState) -> None:
        write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in state.history).encode())

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")


def versions() -> dict[str, str]:
    """What a model card records of the software that trained it: torchyard, torch, numpy, scikit-learn, Python."""
    return {"torchyard": torchyard_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def model_card(spec: JobSpec, plan: ShapeReport, input_shape, n_outputs: int, summary: dict[str, Any]) -> dict:
    """Everything needed to rebuild the network (spec and shapes) and to judge the run."""
    return {
        "format": CARD_FORMAT,
        "name": spec.name,
        "task": spec.task,
        "seed": spec.seed,
        "input_shape": list(input_shape),
        "n_outputs": n_outputs,
        "layers": [{"index": i, "type": layer.type, "output_shape": list(layer.output_shape),
                    "parameters": layer.parameters} for i, layer in enumerate(plan.layers)],
        "total_parameters": plan.total_parameters,
        **summary,
        "versions": versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec": spec.model_dump(mode="json"),
    }


def write_card(card: dict, path: Path) -> None:
    write_atomically(path, (json.dumps(card, indent=2) + "\n").encode())
