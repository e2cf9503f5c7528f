"""The engine trains real PyTorch models and its numbers are the numbers PyTorch gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.datasets import load_digits, make_classification, make_regression
from sklearn.linear_model import LinearRegression
from torch import nn

import torchyard
from models.spec import Limits, SpecError
from models.validation import parse_spec
from worker.engine import Callback, StopTraining, train


def spec_of(**overrides) -> dict:
    base = {
        "name": "t",
        "seed": 3,
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression",
                 "params": {"n_samples": 200, "n_features": 5, "noise": 1.0, "random_state": 0},
                 "validation_split": 0.0},
        "model": {"layers": [{"type": "Linear", "out_features": 8}, {"type": "Tanh"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.001},
        "training": {"epochs": 4, "batch_size": 32},
    }
    base.update(overrides)
    return base


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_epoch_losses_equal_a_hand_written_pytorch_loop(tmp_path):
    spec = parse_spec(spec_of())
    result = train(spec, tmp_path)
    engine_losses = [row["loss"] for row in read_metrics(result.metrics_path)]

    X, y = make_regression(n_samples=200, n_features=5, noise=1.0, random_state=0)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).reshape(-1, 1)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    # fused=True: the kernel the engine uses for SGD on the CPU (components.optimizer_kernels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001, fused=True)
    generator = torch.Generator().manual_seed(3)
    hand_losses = []
    for _epoch in range(4):
        order = torch.randperm(200, generator=generator)
        xs, ys = X[order], y[order]
        total = 0.0
        for start in range(0, 200, 32):
            loss = nn.functional.mse_loss(model(xs[start:start + 32]), ys[start:start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xs[start:start + 32])
        hand_losses.append(total / 200)

    assert engine_losses == pytest.approx(hand_losses, abs=1e-6, rel=1e-6)
    assert engine_losses[-1] < engine_losses[0]


def test_the_tutorial_linear_regression_ends_near_least_squares(tmp_path):
    spec = parse_spec({
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression", "validation_split": 0,
                 "params": {"n_samples": 500, "n_features": 1, "noise": 10.0, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 1}]},
        "loss": {"type": "MSELoss"},
        "optimizer": {"type": "SGD", "lr": 0.02},
        "training": {"epochs": 30, "batch_size": 50},
    })
    train(spec, tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "weights.safetensors")

    X, y = make_regression(n_samples=500, n_features=1, noise=10.0, random_state=0)
    reference = LinearRegression().fit(X, y)
    assert reference.coef_[0] == pytest.approx(45.50, abs=0.01)
    assert reference.intercept_ == pytest.approx(-0.77, abs=0.01)
    assert weights["body.0.weight"].item() == pytest.approx(reference.coef_[0], abs=0.1)
    assert weights["body.0.bias"].item() == pytest.approx(reference.intercept_, abs=0.1)


def test_a_small_cnn_learns_the_digits(tmp_path):
    spec = parse_spec({
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "load_digits", "image_shape": [1, 8, 8],
                 "validation_split": 0.2, "standardize": True},
        "model": {"layers": [
            {"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
            {"type": "BatchNorm2d"}, {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
            {"type": "Flatten"}, {"type": "Dropout", "p": 0.1}, {"type": "Linear", "out_features": 10},
        ]},
        "optimizer": {"type": "Adam", "lr": 0.01},
        "training": {"epochs": 8, "batch_size": 64},
    })
    result = train(spec, tmp_path)
    assert result.status == "succeeded"
    assert result.final_metrics["val_accuracy"] > 0.9

    # The saved model predicts from raw pixels: the standardization travels inside it.
    model = torchyard.load_model(tmp_path)
    X, y = load_digits(return_X_y=True)
    predictions = model(torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)).argmax(dim=1)
    assert (predictions.numpy() == y).mean() > 0.9


def test_load_model_predicts_exactly_what_the_trained_network_predicts(tmp_path):
    seen = {}

    class KeepModel(Callback):
        def on_train_end(self, state, result):
            seen["model"] = state.model

    spec = parse_spec(spec_of(data={"source": "sklearn", "name": "make_regression", "standardize": True,
                                    "params": {"n_samples": 200, "n_features": 5, "random_state": 0}}))
    train(spec, tmp_path, callbacks=[KeepModel()])
    x = torch.randn(16, 5) * 3
    loaded = torchyard.load_model(tmp_path)
    seen["model"].eval()
    assert torch.equal(loaded(x), seen["model"](x))


def test_a_diverging_loss_fails_the_run_with_the_reason(tmp_path):
    spec = parse_spec(spec_of(optimizer={"type": "SGD", "lr": 1e6}, training={"epochs": 20, "batch_size": 32}))
    result = train(spec, tmp_path)
    assert result.status == "failed"
    assert "loss became" in result.error and ("nan" in result.error or "inf" in result.error)
    assert not (tmp_path / "weights.safetensors").exists()


RUN_TIME_LIMIT = ("timed out after 1 s of training (limit: training.max_runtime_seconds, at most the deployment's "
                  "max_runtime_seconds)")


@pytest.mark.parametrize("spec_seconds, deployment_seconds", [(1, 3600), (3600, 1)])
def test_the_smaller_of_the_spec_s_and_the_deployment_s_run_time_limit_fails_the_run(tmp_path, spec_seconds,
                                                                                     deployment_seconds):
    spec = parse_spec(spec_of(training={"epochs": 10_000, "batch_size": 10, "max_runtime_seconds": spec_seconds}))
    result = train(spec, tmp_path, limits=Limits(max_runtime_seconds=deployment_seconds))
    assert (result.status, result.error) == ("failed", RUN_TIME_LIMIT)
    assert 0 < result.epochs_completed < 10_000
    assert not (tmp_path / "weights.safetensors").exists()


def test_the_run_time_limit_counts_the_training_time_of_earlier_attempts(tmp_path):
    class PreemptAfterTwoSeconds(Callback):
        def on_batch_end(self, state):
            if state.elapsed_seconds > 2:
                raise StopTraining("preempted", checkpoint=True)

    spec = parse_spec(spec_of(training={"epochs": 10_000, "batch_size": 10}))
    first = train(spec, tmp_path, callbacks=[PreemptAfterTwoSeconds()])
    assert first.status == "stopped"
    resumed = train(spec, tmp_path, resume=True, limits=Limits(max_runtime_seconds=1))
    assert (resumed.status, resumed.error) == ("failed", RUN_TIME_LIMIT)
    assert resumed.epochs_completed == first.epochs_completed  # it failed at its first batch


def test_a_callback_can_stop_training_at_a_batch_boundary(tmp_path):
    class CancelAtBatch(Callback):
        def on_batch_end(self, state):
            if state.epoch == 1 and state.batch == 2:
                raise StopTraining("cancelled")

    result = train(parse_spec(spec_of()), tmp_path, callbacks=[CancelAtBatch()])
    assert (result.status, result.stop_reason, result.epochs_completed) == ("stopped", "cancelled", 1)
    assert not (tmp_path / "weights.safetensors").exists()


@pytest.mark.parametrize("task, loss, final", [
    ("binary", "BCEWithLogitsLoss", []),
    ("binary", "BCELoss", [{"type": "Sigmoid"}]),
    ("multiclass", "CrossEntropyLoss", []),
    ("multiclass", "NLLLoss", [{"type": "LogSoftmax", "dim": 1}]),
])
def test_classification_losses_train_and_report_accuracy(tmp_path, task, loss, final):
    n_classes = 2 if task == "binary" else 3
    spec = parse_spec({
        "task": task,
        "data": {"source": "sklearn", "name": "make_classification",
                 "params": {"n_samples": 300, "n_features": 6, "n_informative": 4, "n_classes": n_classes,
                            "random_state": 1}},
        "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1 if task == "binary" else 3}, *final]},
        "loss": {"type": loss},
        "optimizer": {"type": "Adam", "lr": 0.02},
        "training": {"epochs": 15, "batch_size": 32},
    })
    result = train(spec, tmp_path)
    assert result.status == "succeeded"
    assert result.final_metrics["val_accuracy"] > 0.7


@pytest.mark.parametrize("optimizer", [
    {"type": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"type": "Adam", "lr": 0.01, "amsgrad": True},
    {"type": "AdamW", "lr": 0.01},
    {"type": "RMSprop", "lr": 0.005, "centered": True},
    {"type": "Adagrad", "lr": 0.1},
    {"type": "Adadelta"},
])
def test_every_optimizer_lowers_the_loss(tmp_path, optimizer):
    spec = parse_spec(spec_of(optimizer=optimizer, training={"epochs": 6, "batch_size": 16},
                              data={"source": "sklearn", "name": "make_regression", "standardize": True,
                                    "params": {"n_samples": 200, "n_features": 5, "random_state": 0}}))
    result = train(spec, tmp_path)
    losses = [row["loss"] for row in read_metrics(result.metrics_path)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("scheduler, expected_lrs", [
    ({"type": "StepLR", "step_size": 2, "gamma": 0.5}, [0.1, 0.1, 0.05, 0.05]),
    ({"type": "MultiStepLR", "milestones": [1, 3], "gamma": 0.1}, [0.1, 0.01, 0.01, 0.001]),
    ({"type": "ExponentialLR", "gamma": 0.5}, [0.1, 0.05, 0.025, 0.0125]),
    ({"type": "CosineAnnealingLR", "T_max": 2}, [0.1, 0.05, 0.0, 0.05]),
])
def test_epoch_schedulers_set_the_learning_rate_of_each_epoch(tmp_path, scheduler, expected_lrs):
    spec = parse_spec(spec_of(scheduler=scheduler, optimizer={"type": "SGD", "lr": 0.1},
                              data={"source": "sklearn", "name": "make_regression", "standardize": True,
                                    "params": {"n_samples": 100, "n_features": 5, "random_state": 0}}))
    result = train(spec, tmp_path)
    lrs = [row["lr"] for row in read_metrics(result.metrics_path)]
    assert lrs == pytest.approx(expected_lrs, abs=1e-9)


def test_one_cycle_and_plateau_schedulers_run(tmp_path):
    for scheduler in ({"type": "OneCycleLR", "max_lr": 0.1},
                      {"type": "ReduceLROnPlateau", "monitor": "loss", "patience": 0, "factor": 0.5}):
        spec = parse_spec(spec_of(scheduler=scheduler, optimizer={"type": "SGD", "lr": 0.1}))
        assert train(spec, tmp_path / scheduler["type"]).status == "succeeded"


def test_every_layer_type_builds_and_trains(tmp_path):
    spec = parse_spec({
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "load_digits", "image_shape": [1, 8, 8]},
        "model": {"layers": [
            {"type": "Conv2d", "out_channels": 4, "kernel_size": 3, "padding": "same"},
            {"type": "BatchNorm2d"}, {"type": "LeakyReLU"}, {"type": "AvgPool2d", "kernel_size": 2},
            {"type": "MaxPool2d", "kernel_size": 2, "stride": 1}, {"type": "Flatten"},
            {"type": "Linear", "out_features": 12}, {"type": "LayerNorm"}, {"type": "SELU"},
            {"type": "BatchNorm1d"}, {"type": "GELU", "approximate": "tanh"}, {"type": "ELU"},
            {"type": "Softplus"}, {"type": "Identity"}, {"type": "Dropout", "p": 0.2}, {"type": "Sigmoid"},
            {"type": "Linear", "out_features": 10}, {"type": "Softmax", "dim": 1}, {"type": "Tanh"},
            {"type": "ReLU"}, {"type": "Linear", "out_features": 10},
        ]},
        "training": {"epochs": 1, "batch_size": 128},
    })
    assert train(spec, tmp_path).status == "succeeded"


def test_conv1d_and_1d_pooling_on_sequences(tmp_path):
    spec = parse_spec({
        "task": "binary",
        "data": {"source": "sklearn", "name": "make_classification", "image_shape": [2, 8],
                 "params": {"n_samples": 200, "n_features": 16, "random_state": 0}},
        "model": {"layers": [
            {"type": "Conv1d", "out_channels": 4, "kernel_size": 3}, {"type": "BatchNorm1d"}, {"type": "ReLU"},
            {"type": "MaxPool1d", "kernel_size": 2}, {"type": "AvgPool1d", "kernel_size": 3},
            {"type": "Flatten"}, {"type": "Linear", "out_features": 1},
        ]},
        "training": {"epochs": 2},
    })
    result = train(spec, tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    assert result.status == "succeeded"
    assert [layer["output_shape"] for layer in card["layers"]][:5] == [[4, 6], [4, 6], [4, 6], [4, 3], [4, 1]]


def test_csv_and_npz_files_train_like_generated_data(tmp_path):
    X, y = make_classification(n_samples=120, n_features=3, n_informative=3, n_redundant=0, random_state=0)
    csv_path = tmp_path / "data.csv"
    np.savetxt(csv_path, np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    npz_path = tmp_path / "data.npz"
    np.savez(npz_path, X=X, y=y)
    layers = [{"type": "Linear", "out_features": 1}]
    for source in ({"source": "file", "path": str(csv_path), "target": "label"},
                   {"source": "file", "path": str(npz_path)}):
        spec = parse_spec({"task": "binary", "data": source, "model": {"layers": layers}})
        assert train(spec, tmp_path / source["path"][-3:]).status == "succeeded"


def test_an_npz_with_an_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, X=np.array([object()], dtype=object), y=np.zeros(1))
    spec = parse_spec({"task": "regression", "data": {"source": "file", "path": str(path)},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]}})
    with pytest.raises(SpecError, match="pickle"):
        train(spec, tmp_path / "out")


def test_a_csv_with_text_names_the_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,y\n1,2,0\n3,oops,1\n")
    spec = parse_spec({"task": "binary", "data": {"source": "file", "path": str(path), "target": "y"},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]}})
    with pytest.raises(SpecError, match=r"line 3, column 'b': 'oops' is not a number"):
        train(spec, tmp_path / "out")


def test_a_network_that_does_not_fit_a_file_is_refused_before_training(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((10, 4)), y=np.arange(10) % 3)
    spec = parse_spec({"task": "multiclass", "data": {"source": "file", "path": str(path)},
                       "model": {"layers": [{"type": "Linear", "out_features": 2}]}})
    with pytest.raises(SpecError, match=r"model.layers\[0\]: the network ends with 2 outputs .* needs 3"):
        train(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_device_auto_picks_what_this_machine_has_and_a_missing_one_is_a_clear_error(tmp_path):
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert train(parse_spec(spec_of()), tmp_path).device.startswith(expected)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="resources.device: 'cuda' was asked for"):
            train(parse_spec(spec_of(resources={"device": "cuda"})), tmp_path / "cuda")


def test_max_samples_is_enforced_on_file_data(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((50, 2)), y=np.zeros(50))
    spec = parse_spec({"task": "regression", "data": {"source": "file", "path": str(path)},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]}})
    with pytest.raises(SpecError, match="max_samples"):
        train(spec, tmp_path / "out", limits=Limits(max_samples=10))


def test_generated_data_past_float32_is_refused_naming_the_data_instead_of_training_on_infinities(tmp_path):
    # noise 3e38 is a float32 itself, but the points it scatters are not all within float32's range.
    params = {"n_samples": 200, "n_features": 5, "noise": 3e38, "random_state": 0}
    spec = parse_spec(spec_of(data={"source": "sklearn", "name": "make_regression", "params": params,
                                    "validation_split": 0.0}))
    with pytest.raises(SpecError, match=r"data: the data holds values beyond float32's range \(±3.403e\+38\)"):
        train(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_generator_without_random_state_draws_the_same_data_every_attempt_from_the_jobs_seed():
    from worker.engine.data import load_arrays

    params = {"n_samples": 50, "n_features": 3, "noise": 1.0}
    first, again = (load_arrays(parse_spec(spec_of(data={"source": "sklearn", "name": "make_regression",
                                                         "params": params}))) for _ in range(2))
    other_seed = load_arrays(parse_spec(spec_of(seed=4, data={"source": "sklearn", "name": "make_regression",
                                                              "params": params})))
    assert np.array_equal(first.X, again.X) and np.array_equal(first.y, again.y)
    assert not np.array_equal(first.X, other_seed.X)
