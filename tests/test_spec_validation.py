"""A bad spec is refused before any training, every problem named by its field path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.spec import JobSpec, Limits, SpecError
from models.validation import parse_spec

EXAMPLES = Path(__file__).parent.parent / "examples"

GOOD = {
    "name": "circles",
    "task": "binary",
    "data": {"source": "sklearn", "name": "make_circles", "params": {"n_samples": 300, "noise": 0.1}},
    "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                         {"type": "Dropout", "p": 0.1}, {"type": "Linear", "out_features": 1}]},
    "optimizer": {"type": "Adam", "lr": 0.1},
    "training": {"epochs": 10, "batch_size": 50},
    "early_stopping": {"monitor": "val_loss", "patience": 3},
}


def mutate(path: str, value) -> dict:
    """GOOD with one field set (value DELETE removes it); paths like 'model.layers.0.type'."""
    spec = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key = int(last) if last.isdigit() else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return spec


DELETE = object()
CONV = {"type": "Conv2d", "out_channels": 4, "kernel_size": 3}

BAD_SPECS = [
    (mutate("model.layers.0.type", "Linaer"), "model.layers[0].type",
     "'Linaer' is not a layer; did you mean 'Linear'?"),
    (mutate("model.layers.0.out_features", 0), "model.layers[0].out_features", "greater than or equal to 1"),
    (mutate("model.layers.0.out_features", "16"), "model.layers[0].out_features", "valid integer"),
    (mutate("model.layers.0.in_features", 2), "model.layers[0].in_features", "inferred from the data"),
    (mutate("model.layers.0.activation", "relu"), "model.layers[0].activation", "unknown field"),
    (mutate("model.layers.1", {"kind": "ReLU"}), "model.layers[1].type", "missing"),
    (mutate("model.layers.2.p", 1.5), "model.layers[2].p", "less than 1"),
    (mutate("model.layers.3.out_features", 2), "model.layers[3]", "needs 1 (one logit for two classes)"),
    (mutate("model.layers", []), "model.layers", "at least 1 item"),
    (mutate("model.layers.0", CONV), "model.layers[0].type", "Conv2d needs input of channels x height x width"),
    (mutate("model.layers.1", {"type": "Conv2d", "out_channels": 2, "kernel_size": 3}), "model.layers[1].type",
     "check the layers before it"),
    (mutate("optimizer.type", "adam"), "optimizer.type", "did you mean 'Adam'"),
    (mutate("optimizer.lr", -0.1), "optimizer.lr", "greater than 0"),
    (mutate("optimizer.betas", [0.9]), "optimizer.betas", "at least 2 items"),
    (mutate("optimizer", {"type": "SGD", "nesterov": True}), "optimizer", "nesterov requires momentum"),
    (mutate("loss", {"type": "MSELoss"}), "loss.type", "does not fit task 'binary'"),
    (mutate("loss", {"type": "CrossEntropy"}), "loss.type", "did you mean 'CrossEntropyLoss'"),
    (mutate("scheduler", {"type": "StepLR"}), "scheduler.step_size", "Field required"),
    (mutate("scheduler", {"type": "CosineLR", "T_max": 3}), "scheduler.type", "is not a scheduler"),
    (mutate("task", "classification"), "task", "'regression', 'binary' or 'multiclass'"),
    (mutate("task", DELETE), "task", "Field required"),
    (mutate("task", "multiclass"), "model.layers[3]", "needs 2 (one per class)"),
    (mutate("data.name", "make_circle"), "data.name", "did you mean 'make_circles'"),
    (mutate("data.params.n_sample", 100), "data.params.n_sample", "did you mean 'n_samples'"),
    (mutate("data.params.n_samples", -5), "data.params.n_samples", "whole number from 1"),
    (mutate("data.source", "url"), "data.source", "is not a data source"),
    (mutate("data.validation_split", 1.5), "data.validation_split", "less than or equal to 0.9"),
    (mutate("data.image_shape", [3, 5, 5]), "data.image_shape", "holds 75 values but each sample has 2"),
    (mutate("data", {"source": "sklearn", "name": "load_diabetes"}), "task", "needs class labels"),
    (mutate("data", {"source": "sklearn", "name": "load_iris"}), "task", "'binary' needs 2 classes"),
    (mutate("early_stopping.monitor", "val_acc"), "early_stopping.monitor", "did you mean 'val_accuracy'"),
    (mutate("early_stopping.patience", -1), "early_stopping.patience", "greater than or equal to 0"),
    (mutate("data.validation_split", 0), "early_stopping.monitor", "'val_loss' is not a metric"),
    (mutate("training.epochs", 0), "training.epochs", "greater than or equal to 1"),
    (mutate("training.batch_size", "big"), "training.batch_size", "valid integer"),
    ({**GOOD, "resources": {"device": "tpu"}}, "resources.device", "'auto', 'cpu', 'cuda' or 'mps'"),
    ({**GOOD, "python": "import os"}, "python", "unknown field"),
]


@pytest.mark.parametrize("spec, path, message", BAD_SPECS, ids=[case[1] + ":" + case[2][:30] for case in BAD_SPECS])
def test_a_bad_spec_is_refused_naming_the_field(spec, path, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert path in problems, problems
    assert message in problems[path]


def test_every_problem_is_listed_at_once():
    spec = mutate("optimizer.lr", 0)
    spec["model"]["layers"][0]["type"] = "Dense"
    spec["training"]["epochs"] = -1
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert {p.path for p in caught.value.problems} == {"optimizer.lr", "model.layers[0].type", "training.epochs"}


@pytest.mark.parametrize("limits, path, message", [
    (Limits(max_layers=3), "model.layers", "4 layers exceed the limit of 3 (max_layers)"),
    (Limits(max_epochs=5), "training.epochs", "10 exceeds the limit of 5 (max_epochs)"),
    (Limits(max_samples=100), "data.params.n_samples", "300 samples exceed the limit of 100 (max_samples)"),
    (Limits(max_parameters=50), "model", "65 parameters exceed the limit of 50 (max_parameters)"),
])
def test_a_spec_over_a_limit_is_refused_with_the_limit_named(limits, path, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(GOOD, limits)
    assert {p.path: p.message for p in caught.value.problems}[path] == message


def test_a_spec_that_is_not_an_object_is_refused():
    with pytest.raises(SpecError, match="a spec is a JSON object"):
        parse_spec([1, 2])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_example_spec_is_valid(path):
    spec = parse_spec(json.loads(path.read_text()))
    assert isinstance(spec, JobSpec)


def test_the_cli_refuses_a_bad_spec_with_the_field_path_and_exit_code_2(tmp_path):
    spec_path = tmp_path / "bad.json"
    spec_path.write_text(json.dumps(mutate("model.layers.0.type", "Linaer")))
    run = subprocess.run([sys.executable, "-m", "torchyard.cli", "train", str(spec_path), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "model.layers[0].type: 'Linaer' is not a layer; did you mean 'Linear'?" in run.stderr
    assert not (tmp_path / "out").exists()
