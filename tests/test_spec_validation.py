"""A bad spec is refused before any training, every problem named by its field path."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.catalog import DataShape
from models.shapes import describe_data, fit_problems
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
    (mutate("training.epoch", 3), "training.epoch", "unknown field; did you mean 'epochs'?"),
    (mutate("model.layers.0.out_feature", 3), "model.layers[0].out_feature", "did you mean 'out_features'?"),
    ({**GOOD, "optimiser": GOOD["optimizer"]}, "optimiser", "unknown field; did you mean 'optimizer'?"),
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
    (mutate("scheduler", {"type": "StepLR"}), "scheduler.step_size", "missing"),
    (mutate("scheduler", {"type": "CosineLR", "T_max": 3}), "scheduler.type", "is not a scheduler"),
    (mutate("task", "classification"), "task", "'regression', 'binary' or 'multiclass'"),
    (mutate("task", DELETE), "task", "missing"),
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
    (mutate("training.accumulate_batches", 0), "training.accumulate_batches", "greater than or equal to 1"),
    (mutate("training.accumulate_batches", 1025), "training.accumulate_batches", "less than or equal to 1024"),
    (mutate("training.gradient_clip_norm", 0), "training.gradient_clip_norm", "greater than 0"),
    (mutate("training.gradient_clip_norm", 1e39), "training.gradient_clip_norm", "float32"),
    (mutate("training.precision", 16), "training.precision", "'32', 'bf16' or '16'"),
    (mutate("training.precision", "16-mixed"), "training.precision", "'32', 'bf16' or '16'"),
    (mutate("training.precision", "16") | {"resources": {"device": "cpu"}}, "training.precision",
     "'16' (float16 with a gradient scaler) needs CUDA, and this run's device is 'cpu'; use 'bf16' or set "
     "resources.device to 'cuda'"),
    (mutate("training.precision", "bf16") | {"resources": {"device": "mps"}}, "training.precision",
     "'bf16' is not supported on 'mps'; use '32'"),
    (mutate("loss", {"type": "BCEWithLogitsLoss", "weight": [1.0, 2.0]}), "loss.weight", "unknown field"),
    ({**GOOD, "resources": {"device": "tpu"}}, "resources.device", "'auto', 'cpu', 'cuda' or 'mps'"),
    ({**GOOD, "python": "import os"}, "python", "unknown field"),
    # A value that fits no member of a union: one problem, at the deepest path a member reached.
    (mutate("model.layers.0", {**CONV, "kernel_size": [3, "a"]}), "model.layers[0].kernel_size[1]",
     "valid integer"),
    (mutate("model.layers.0", {**CONV, "padding": "wide"}), "model.layers[0].padding",
     "Input should be a valid integer or a valid list or 'same' or 'valid'"),
    (mutate("data", {"source": "sklearn", "name": "load_iris", "params": {"n": 1}}), "data.params.n",
     "'n' is not a parameter of load_iris; there are none"),
    # Invisible format characters (Unicode category Cf) disguise a name: "bidi\u202egnp.exe" shows as
    # "bidiexe.png"; a zero-width space makes two equal-looking names differ.
    (mutate("name", "bidi\u202egnp.exe"), "name",
     "'\\u202e' at position 4 is an invisible format character (Unicode category Cf"),
    (mutate("name", "a\u2066b\u2069"), "name", "'\\u2066' at position 1 is an invisible format character"),
    (mutate("name", "run\u200b"), "name", "'\\u200b' at position 3 is an invisible format character"),
    (mutate("name", "\ufeffrun"), "name", "'\\ufeff' at position 0 is an invisible format character"),
    (mutate("data.params.shuffle", "\u200fx"), "data.params.shuffle", "invisible format character"),
]

# Numbers past float32's range: JSON and float64 hold them, the engine's tensors and kernels can't.
BEYOND_FLOAT32 = [
    (mutate("optimizer.lr", 1e308), "optimizer.lr"),
    (mutate("optimizer", {"type": "SGD", "momentum": 1e39}), "optimizer.momentum"),
    (mutate("model.layers.1", {"type": "ELU", "alpha": 1e308}), "model.layers[1].alpha"),
    (mutate("model.layers.1", {"type": "LeakyReLU", "negative_slope": 3.5e38}), "model.layers[1].negative_slope"),
    (mutate("early_stopping.baseline", -1e39), "early_stopping.baseline"),
    (mutate("early_stopping.min_delta", 1e300), "early_stopping.min_delta"),
    (mutate("scheduler", {"type": "ExponentialLR", "gamma": 1e300}), "scheduler.gamma"),
    (mutate("data.params.noise", 1e300), "data.params.noise"),
    (mutate("data", {"source": "sklearn", "name": "make_regression", "params": {"bias": -1e300}}),
     "data.params.bias"),
    (mutate("data", {"source": "sklearn", "name": "make_classification", "params": {"scale": [1.0, 1e300]}}),
     "data.params.scale"),
]


@pytest.mark.parametrize("spec, path", BEYOND_FLOAT32, ids=[case[1] for case in BEYOND_FLOAT32])
def test_a_number_beyond_float32s_range_is_refused_naming_the_field(spec, path):
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert "within float32's range (±3.403e+38)" in problems[path], problems


def test_the_largest_float32_is_still_a_number_a_spec_may_hold():
    assert parse_spec(mutate("early_stopping.min_delta", 3.4028234663852886e38)).early_stopping.min_delta > 0


@pytest.mark.parametrize("scheduler, epochs, reach", [
    ({"type": "ExponentialLR", "gamma": 1e30}, 10, "1e269 within 10 epochs"),
    ({"type": "StepLR", "step_size": 2, "gamma": 1e10}, 10, "1e39 within 10 epochs"),
    ({"type": "MultiStepLR", "milestones": [1, 2, 3, 50], "gamma": 1e20}, 10, "1e59 within 10 epochs"),
])
def test_a_schedule_that_grows_the_learning_rate_past_float32_is_refused(scheduler, epochs, reach):
    spec = GOOD | {"scheduler": scheduler, "training": {"epochs": epochs, "batch_size": 50},
                   "optimizer": {"type": "Adam", "lr": 0.1}}
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert f"the learning rate would reach {reach}" in problems["scheduler.gamma"], problems


@pytest.mark.parametrize("scheduler, path", [
    ({"type": "OneCycleLR", "max_lr": 1.0, "div_factor": 1e-39}, "scheduler.div_factor"),
    ({"type": "OneCycleLR", "max_lr": 1.0, "div_factor": 1e-3, "final_div_factor": 1e-38},
     "scheduler.final_div_factor"),
])
def test_a_one_cycle_schedule_that_runs_past_float32_is_refused(scheduler, path):
    with pytest.raises(SpecError) as caught:
        parse_spec(GOOD | {"scheduler": scheduler})
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert "beyond float32's range" in problems[path], problems


def test_a_schedule_that_grows_the_learning_rate_within_float32_is_accepted():
    spec = GOOD | {"scheduler": {"type": "StepLR", "step_size": 2, "gamma": 1e9}, "training": {"epochs": 10}}
    assert parse_spec(spec).scheduler.gamma == 1e9  # 0.1 * 1e9 ** 4 = 1e35: large, but a float32 holds it


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


# --- accepted means runnable: what used to pass here and fail at the worker ------------------------

def blobs(**params) -> dict:
    """GOOD on make_blobs (3 classes of 2 features unless ``params`` say otherwise), multiclass."""
    spec = mutate("data", {"source": "sklearn", "name": "make_blobs",
                           "params": {"n_samples": 60, "random_state": 0, **params}})
    spec["task"] = "multiclass"
    centers = params.get("centers", 3)
    spec["model"]["layers"][-1]["out_features"] = centers if isinstance(centers, int) else 3
    return spec


def on_image(shape: list[int], *layers: dict, **data) -> dict:
    """A multiclass spec whose load_digits samples are read as ``shape`` and pass through ``layers``."""
    return {"task": "multiclass", "data": {"source": "sklearn", "name": "load_digits", "image_shape": shape, **data},
            "model": {"layers": [*layers, {"type": "Flatten"}, {"type": "Linear", "out_features": 10}]}}


def with_early_stopping_off(spec: dict) -> dict:
    return {key: value for key, value in spec.items() if key != "early_stopping"}


def without_validation(spec: dict) -> dict:
    return with_early_stopping_off({**spec, "data": {**spec["data"], "validation_split": 0}})


def refused(spec: dict, limits: Limits | None = None) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec, limits)
    return {problem.path: problem.message for problem in caught.value.problems}


UNRUNNABLE = [
    # Class weights: one per class, each positive.
    (blobs() | {"loss": {"type": "CrossEntropyLoss", "weight": [1.0, 2.0]}}, "loss.weight",
     "2 class weights for 3 classes; give one per class"),
    (blobs() | {"loss": {"type": "NLLLoss", "weight": [1.0, 2.0, 3.0, 4.0]}}, "loss.weight",
     "4 class weights for 3 classes; give one per class"),
    (blobs() | {"loss": {"type": "CrossEntropyLoss", "weight": [1.0, -2.0, 3.0]}}, "loss.weight[1]",
     "greater than 0"),
    (blobs() | {"loss": {"type": "CrossEntropyLoss", "weight": [1e38] * 3}}, "loss.weight[0]",
     "less than or equal to 1000000"),
    (GOOD | {"loss": {"type": "BCEWithLogitsLoss", "pos_weight": 1e7}}, "loss.pos_weight",
     "less than or equal to 1000000"),
    # 10 epochs of 5 batches, 3 to an optimizer step: 10 epochs of 2 steps.
    (GOOD | {"training": {"epochs": 10, "batch_size": 50, "accumulate_batches": 3},
             "scheduler": {"type": "OneCycleLR", "max_lr": 0.1, "pct_start": 0.05}}, "scheduler.pct_start",
     "0.05 of 20 steps (10 epochs of 2 steps) puts a phase of OneCycleLR on a single step"),
    # Flatten's dims count the batch: an input of 64 features has dims -2..1.
    (mutate("model.layers.0", {"type": "Flatten", "start_dim": 5}), "model.layers[0].start_dim",
     "5 is out of range for an input of 2 dimensions with the batch (shape [batch, 2]): use -2 to 1"),
    (mutate("model.layers.0", {"type": "Flatten", "end_dim": -3}), "model.layers[0].end_dim", "out of range"),
    (on_image([4, 4, 4], {"type": "Flatten", "start_dim": 3, "end_dim": 2}), "model.layers[0].end_dim",
     "comes before start_dim (dimension 2 before 3)"),
    # Reflect padding must be shorter than the input; circular padding at most as long.
    (on_image([4, 16], {"type": "Conv1d", "out_channels": 2, "kernel_size": 3, "padding": 16,
                        "padding_mode": "reflect"}), "model.layers[0].padding",
     "'reflect' padding must be less than the length it pads: 16 on an input of [16]"),
    (on_image([1, 8, 8], {"type": "Conv2d", "out_channels": 2, "kernel_size": 3, "padding": [1, 9],
                          "padding_mode": "circular"}), "model.layers[0].padding",
     "'circular' padding must be at most the length it pads: 9 on an input of [8, 8]"),
    (on_image([4, 16], {"type": "Conv1d", "out_channels": 2, "kernel_size": 34, "padding": "same",
                        "padding_mode": "circular"}), "model.layers[0].padding",
     "'circular' padding must be at most the length it pads: 17 on an input of [16]"),
    # scikit-learn's own rules: its declared constraints, then its function on two samples.
    (blobs(random_state=2**32), "data.params.random_state", "must be an int in the range [0, 4294967295]"),
    (blobs(centers=[0.0, 5.0, 10.0]), "data.params.centers", "make_blobs refuses these arguments: Expected 2D array"),
    (blobs(cluster_std=-1.0), "data.params.cluster_std", "must be a float in the range [0.0, inf)"),
    (blobs(cluster_std=[1.0, 2.0]), "data.params.cluster_std",
     "make_blobs refuses these arguments: Length of `clusters_std` not consistent with number of centers"),
    (mutate("data.params.noise", -0.1), "data.params.noise", "must be a float in the range [0.0, inf) or None"),
    (mutate("data.params.factor", 1.0), "data.params.factor", "must be a float in the range [0.0, 1.0)"),
    (mutate("data", {"source": "sklearn", "name": "make_classification",
                     "params": {"n_features": 4, "n_informative": 6}}), "data.params",
     "make_classification refuses these arguments: Number of informative, redundant and repeated features must sum "
     "to less than the number of total features"),
    (mutate("data", {"source": "sklearn", "name": "make_classification",
                     "params": {"n_features": 4, "n_informative": 2, "n_redundant": 2, "n_repeated": 1}}),
     "data.params", "must sum to less than the number of total features"),
    (mutate("data", {"source": "sklearn", "name": "make_classification",
                     "params": {"n_informative": 2, "n_classes": 2, "n_clusters_per_class": 3}}),
     "data.params.n_classes", "n_classes(2) * n_clusters_per_class(3) must be smaller or equal 2**n_informative(2)=4"),
    (mutate("data", {"source": "sklearn", "name": "make_classification", "params": {"shift": [1.0, 2.0]}}),
     "data.params.shift", "operands could not be broadcast together"),
    (mutate("data", {"source": "sklearn", "name": "load_digits", "params": {"n_class": 11}}), "data.params.n_class",
     "must be an int in the range [1, 10]"),
    # Data too small for the job.
    (mutate("data.params.n_samples", 2), "data.validation_split",
     "0.2 of 2 rows rounds to no validation rows; raise it, use more rows, or set 0 for no validation"),
    (mutate("data.validation_split", 0.9) | {"data": {**GOOD["data"], "params": {"n_samples": 1},
                                                       "validation_split": 0.9}},
     "data.validation_split", "0.9 of 1 rows leaves no training rows"),
    (without_validation(blobs(n_samples=2)), "data.params.n_samples",
     "2 rows can't hold all 3 classes; each class needs a row"),
    (blobs(centers=1), "task", "'multiclass' needs at least 2 classes, the data has 1"),
    ({**GOOD, "resources": {"device": "cpu", "processes": 4}, "data": {**GOOD["data"], "params": {"n_samples": 4}}},
     "resources.processes", "4 processes need a training row each; the data has 3"),
    # A batch of one sample where BatchNorm normalizes one value per channel.
    (mutate("model.layers.2", {"type": "BatchNorm1d"}) | {"training": {"batch_size": 239}}, "training.batch_size",
     "with 240 training rows and batch_size 239 a batch holds 1 sample"),
    (mutate("model.layers.2", {"type": "BatchNorm1d"}) | {"training": {"batch_size": 1}}, "training.batch_size",
     "BatchNorm1d (model.layers[2]) needs more than one value per channel; pick another batch_size"),
    (with_early_stopping_off(mutate("model.layers.2", {"type": "BatchNorm1d", "track_running_stats": False})
                             | {"data": {**GOOD["data"], "params": {"n_samples": 10}, "validation_split": 0.1}}),
     "data.validation_split", "the validation part has an evaluation chunk of 1 sample (1 rows)"),
    ({**GOOD, "resources": {"device": "cpu", "processes": 2}, "training": {"batch_size": 1}}, "training.batch_size",
     "1 is less than the 2 processes that share each batch; each needs a sample"),
    ({**mutate("model.layers.2", {"type": "BatchNorm1d"}), "resources": {"device": "cpu", "processes": 2},
      "training": {"batch_size": 3}}, "training.batch_size",
     "with 240 training rows and batch_size 3 a process's share of a batch holds 1 sample"),
    # The loss and scheduler against the rest.
    (mutate("loss", {"type": "BCELoss"}), "loss.type", "BCELoss takes probabilities: end the model with a Sigmoid"),
    (mutate("optimizer", {"type": "Adagrad"}) | {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1}},
     "scheduler.type", "OneCycleLR cycles the optimizer's momentum, which Adagrad has not"),
    # 10 epochs of 5 batches (240 training rows, batch_size 50): 50 steps.
    (GOOD | {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1, "pct_start": 0.02}}, "scheduler.pct_start",
     "0.02 of 50 steps (10 epochs of 5 steps) puts a phase of OneCycleLR on a single step"),
    (GOOD | {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1, "pct_start": 0.51, "three_phase": True}},
     "scheduler.pct_start", "0.51 of 50 steps (10 epochs of 5 steps) puts a phase of OneCycleLR on a single step"),
]


@pytest.mark.parametrize("spec, path, message", UNRUNNABLE, ids=[case[1] + ":" + case[2][:40] for case in UNRUNNABLE])
def test_a_spec_that_could_not_run_is_refused_naming_the_field(spec, path, message):
    problems = refused(spec)
    assert path in problems, problems
    assert message in problems[path]


@pytest.mark.parametrize("spec", [
    on_image([4, 16], {"type": "Conv1d", "out_channels": 2, "kernel_size": 3, "padding": 15,
                       "padding_mode": "reflect"}),
    on_image([4, 16], {"type": "Conv1d", "out_channels": 2, "kernel_size": 3, "padding": 16,
                       "padding_mode": "circular"}),
    on_image([4, 16], {"type": "Conv1d", "out_channels": 2, "kernel_size": 33, "padding": "same",
                       "padding_mode": "circular"}),
    on_image([4, 4, 4], {"type": "Flatten", "start_dim": -3, "end_dim": 3}),
    mutate("model.layers.2", {"type": "BatchNorm1d"}) | {"training": {"batch_size": 40}},
    mutate("loss", {"type": "BCELoss"}) | {"model": {"layers": [*GOOD["model"]["layers"], {"type": "Sigmoid"}]}},
    blobs(n_samples=5, centers=5) | {"data": {"source": "sklearn", "name": "make_blobs", "validation_split": 0.2,
                                              "params": {"n_samples": 5, "centers": 5, "random_state": 0}}},
    blobs() | {"loss": {"type": "CrossEntropyLoss", "weight": [1.0, 2.0, 0.5]}},
    # float16 needs CUDA: asked of a spec whose device is, or may be ("auto": the engine checks it), CUDA.
    mutate("training.precision", "16") | {"resources": {"device": "cuda"}},
    mutate("training.precision", "16") | {"resources": {"gpus": 2}},
    mutate("training.precision", "16"),
    mutate("training.precision", "bf16") | {"resources": {"device": "cpu"}},
    mutate("training", {"epochs": 10, "batch_size": 50, "accumulate_batches": 1024, "gradient_clip_norm": 1.0}),
], ids=["reflect-below-length", "circular-at-length", "same-circular", "flatten-all", "batchnorm-even",
        "bce-after-sigmoid", "a-row-a-class", "class-weights", "fp16-cuda", "fp16-gpus", "fp16-auto", "bf16-cpu",
        "accumulate-most"])
def test_the_edges_that_run_are_accepted(spec):
    assert isinstance(parse_spec(with_early_stopping_off(spec)), JobSpec)


def test_a_generator_that_would_draw_too_much_before_its_first_sample_is_refused_with_the_limit():
    spec = mutate("data", {"source": "sklearn", "name": "make_blobs", "params": {"centers": 600, "n_features": 2}})
    problems = refused(spec, Limits(max_generator_setup=500_000))
    assert problems["data.params"] == ("make_blobs with these arguments draws about 601,204 values before its "
                                       "first sample, over the limit of 500,000 (max_generator_setup)")


def test_load_digits_gives_exactly_its_images_of_the_classes_asked_for():
    spec = mutate("data", {"source": "sklearn", "name": "load_digits", "params": {"n_class": 2}})
    assert refused(spec, Limits(max_samples=359))["data.params.n_samples"] == \
        "360 samples exceed the limit of 359 (max_samples)"


@pytest.mark.parametrize("shape, message", [
    (DataShape(0, 3, n_classes=2), "the data has 0 rows of 3 features; training needs at least one of each"),
    (DataShape(10, 0, n_classes=2), "the data has 10 rows of 0 features; training needs at least one of each"),
])
def test_data_without_rows_or_features_is_refused(shape, message):
    spec = JobSpec.model_validate({**GOOD, "data": {"source": "dataset", "dataset_id": "d"}})
    assert [(p.path, p.message) for p in fit_problems(spec, shape)] == [("data", message)]
    assert [(p.path, p.message) for p in describe_data(shape, "binary", None).problems] == [("data", message)]


def test_an_uploaded_dataset_too_small_for_the_split_is_refused_like_a_generated_one():
    spec = JobSpec.model_validate({**GOOD, "data": {"source": "dataset", "dataset_id": "d", "validation_split": 0.2}})
    assert [(p.path, p.message) for p in fit_problems(spec, DataShape(2, 2, n_classes=2))] == [
        ("data.validation_split", "0.2 of 2 rows rounds to no validation rows; raise it, use more rows, or set 0 "
                                  "for no validation")]


def test_the_api_refuses_a_job_on_an_upload_too_small_for_its_split_and_stores_nothing(client, alice, spec):
    upload = {"file": (io.BytesIO(b"x1,x2,label\n0.5,1.5,0\n1.0,-2.0,1\n"), "two.csv"), "target": "label"}
    dataset = client.post("/api/v1/datasets", data=upload, headers=alice, content_type="multipart/form-data").json
    spec["data"] = {"source": "dataset", "dataset_id": dataset["id"], "validation_split": 0.2}
    response = client.post("/api/v1/jobs", json=spec, headers=alice)
    assert response.status_code == 422
    assert [(error["path"], error["message"]) for error in response.json["errors"]] == [
        ("data.validation_split", "0.2 of 2 rows rounds to no validation rows; raise it, use more rows, or set 0 for "
                                  "no validation")]
    assert client.get("/api/v1/jobs", headers=alice).json["jobs"] == []


def test_an_uploaded_dataset_may_skip_class_labels_since_its_classes_are_counted_from_them():
    spec = JobSpec.model_validate({**with_early_stopping_off(GOOD), "task": "multiclass",
                                   "data": {"source": "dataset", "dataset_id": "d", "validation_split": 0},
                                   "model": {"layers": [{"type": "Linear", "out_features": 6}]}})
    assert fit_problems(spec, DataShape(2, 2, n_classes=6)) == []  # labels 0 and 5: six classes, two rows
