"""The engine's building blocks are the torch classes the spec names, with the spec's arguments on them.

Every layer, loss, optimizer and scheduler is built the way a run builds it (``prepare_run``) and checked
argument by argument. Each table of cases must cover its whole allow-list and give every field a value
other than its default somewhere, so a type added to the spec without a case here, or an argument the
engine drops on the way to torch, fails.
"""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from models.spec import LAYER_TYPES, LOSS_TYPES, OPTIMIZER_TYPES, SCHEDULER_TYPES, SpecError
from models.validation import parse_spec
from worker.engine import prepare_run
from worker.engine.components import optimizer_kernels

# One sample has 24 features, seen flat, as a sequence (channels x length) or as an image.
FLAT, SEQUENCE, IMAGE = None, [2, 12], [2, 3, 4]
N_OUTPUTS = {"regression": 1, "binary": 1, "multiclass": 3}
DATA = {
    "regression": {"name": "make_regression", "params": {"n_samples": 40, "n_features": 24, "random_state": 0}},
    "binary": {"name": "make_classification", "params": {"n_samples": 40, "n_features": 24, "random_state": 0}},
    "multiclass": {"name": "make_classification",
                   "params": {"n_samples": 40, "n_features": 24, "n_informative": 4, "n_classes": 3,
                              "random_state": 0}},
}
# 40 samples, 8 of them for validation, in batches of 8: 4 optimizer steps an epoch.
EPOCHS, BATCH_SIZE, STEPS_PER_EPOCH = 3, 8, 4


def prepared_run(tmp_path, *, task: str = "regression", image_shape=FLAT, layers=None, **parts):
    """A run of a tiny spec, set up by the engine and ready to fit (nothing trained)."""
    data = {"source": "sklearn", **DATA[task], "validation_split": 0.2,
            **({"image_shape": image_shape} if image_shape else {})}
    spec = parse_spec({
        "seed": 0,
        "task": task,
        "data": data,
        "model": {"layers": layers or [{"type": "Flatten"}, {"type": "Linear", "out_features": N_OUTPUTS[task]}]},
        "training": {"epochs": EPOCHS, "batch_size": BATCH_SIZE},
        "resources": {"device": "cpu"},
        **parts,
    })
    return prepare_run(spec, tmp_path)


def unset_fields(catalog: dict, cases: list[dict]) -> list[str]:
    """Types with no case, and fields no case gives a value other than the default: a dropped argument
    would go unnoticed there."""
    missing = []
    for name, model in catalog.items():
        given = [case for case in cases if case["type"] == name]
        if not given:
            missing.append(name)
        for field, info in model.model_fields.items():
            if field != "type" and not any(field in case and (info.is_required() or case[field] != info.default)
                                           for case in given):
                missing.append(f"{name}.{field}")
    return missing


def shown(module: nn.Module, name: str):
    """What a module shows of a keyword argument: ``bias`` is whether it has one; tensors as lists."""
    value = getattr(module, name)
    if name == "bias":
        return value is not None
    return value.tolist() if isinstance(value, torch.Tensor) else value


# --- layers -------------------------------------------------------------------------------------

# (spec layer, the data's sample shape, what the torch module shows: every spec field and the inferred size)
LAYER_CASES = [
    ({"type": "Linear", "out_features": 5, "bias": False}, SEQUENCE,
     {"in_features": 12, "out_features": 5, "bias": False}),
    ({"type": "Linear", "out_features": 3}, FLAT, {"in_features": 24, "out_features": 3, "bias": True}),
    ({"type": "Conv1d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2,
      "groups": 2, "bias": False, "padding_mode": "reflect"}, SEQUENCE,
     {"in_channels": 2, "out_channels": 4, "kernel_size": (3,), "stride": (2,), "padding": (1,), "dilation": (2,),
      "groups": 2, "bias": False, "padding_mode": "reflect"}),
    ({"type": "Conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}, IMAGE,
     {"in_channels": 2, "out_channels": 4, "kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1),
      "dilation": (1, 1), "groups": 1, "bias": True, "padding_mode": "zeros"}),
    ({"type": "Conv2d", "out_channels": 2, "kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 0],
      "dilation": [1, 2], "groups": 2, "bias": False}, IMAGE,
     {"in_channels": 2, "out_channels": 2, "kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0),
      "dilation": (1, 2), "groups": 2, "bias": False, "padding_mode": "zeros"}),
    ({"type": "Conv2d", "out_channels": 3, "kernel_size": 3, "padding": "same", "padding_mode": "circular"}, IMAGE,
     {"in_channels": 2, "out_channels": 3, "kernel_size": (3, 3), "stride": (1, 1), "padding": "same",
      "dilation": (1, 1), "groups": 1, "bias": True, "padding_mode": "circular"}),
    ({"type": "MaxPool1d", "kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "ceil_mode": True}, SEQUENCE,
     {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "ceil_mode": True}),
    ({"type": "MaxPool2d", "kernel_size": [2, 3]}, IMAGE,  # stride defaults to the kernel size
     {"kernel_size": (2, 3), "stride": (2, 3), "padding": 0, "dilation": 1, "ceil_mode": False}),
    ({"type": "MaxPool2d", "kernel_size": 3, "stride": [2, 1], "padding": 1, "dilation": [1, 2], "ceil_mode": True},
     IMAGE, {"kernel_size": 3, "stride": (2, 1), "padding": 1, "dilation": (1, 2), "ceil_mode": True}),
    ({"type": "AvgPool1d", "kernel_size": 4, "stride": 2, "padding": 2, "ceil_mode": True,
      "count_include_pad": False}, SEQUENCE,
     {"kernel_size": (4,), "stride": (2,), "padding": (2,), "ceil_mode": True, "count_include_pad": False}),
    ({"type": "AvgPool2d", "kernel_size": 2, "stride": 1, "padding": 1, "count_include_pad": False}, IMAGE,
     {"kernel_size": 2, "stride": 1, "padding": 1, "ceil_mode": False, "count_include_pad": False}),
    ({"type": "AvgPool2d", "kernel_size": [3, 2], "stride": [2, 2], "ceil_mode": True}, IMAGE,
     {"kernel_size": (3, 2), "stride": (2, 2), "padding": 0, "ceil_mode": True, "count_include_pad": True}),
    ({"type": "Flatten", "start_dim": 2, "end_dim": 3}, IMAGE, {"start_dim": 2, "end_dim": 3}),
    ({"type": "Dropout", "p": 0.3}, FLAT, {"p": 0.3}),
    ({"type": "BatchNorm1d", "eps": 1e-3, "momentum": None, "affine": False}, SEQUENCE,
     {"num_features": 2, "eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": True}),
    ({"type": "BatchNorm1d", "momentum": 0.2, "track_running_stats": False}, FLAT,
     {"num_features": 24, "eps": 1e-5, "momentum": 0.2, "affine": True, "track_running_stats": False}),
    ({"type": "BatchNorm2d", "eps": 1e-4, "momentum": 0.3, "affine": False, "track_running_stats": False}, IMAGE,
     {"num_features": 2, "eps": 1e-4, "momentum": 0.3, "affine": False, "track_running_stats": False}),
    ({"type": "LayerNorm", "eps": 1e-4, "bias": False}, SEQUENCE,
     {"normalized_shape": (12,), "eps": 1e-4, "elementwise_affine": True, "bias": False}),
    ({"type": "LayerNorm", "elementwise_affine": False}, FLAT,
     {"normalized_shape": (24,), "eps": 1e-5, "elementwise_affine": False, "bias": False}),
    ({"type": "ReLU"}, FLAT, {}),
    ({"type": "LeakyReLU", "negative_slope": 0.2}, FLAT, {"negative_slope": 0.2}),
    ({"type": "Sigmoid"}, FLAT, {}),
    ({"type": "Tanh"}, FLAT, {}),
    ({"type": "Softmax", "dim": 1}, SEQUENCE, {"dim": 1}),
    ({"type": "LogSoftmax", "dim": -2}, SEQUENCE, {"dim": -2}),
    ({"type": "SELU"}, FLAT, {}),
    ({"type": "Softplus", "beta": 2.0, "threshold": 10.0}, FLAT, {"beta": 2.0, "threshold": 10.0}),
    ({"type": "GELU", "approximate": "tanh"}, FLAT, {"approximate": "tanh"}),
    ({"type": "ELU", "alpha": 0.5}, FLAT, {"alpha": 0.5}),
    ({"type": "Identity"}, FLAT, {}),
]
INFERRED = {"Linear": "in_features", "Conv1d": "in_channels", "Conv2d": "in_channels",
            "BatchNorm1d": "num_features", "BatchNorm2d": "num_features", "LayerNorm": "normalized_shape"}


def test_the_layer_cases_cover_every_layer_type_and_field_the_spec_allows():
    assert unset_fields(LAYER_TYPES, [layer for layer, _shape, _shows in LAYER_CASES]) == []
    for layer, _shape, shows in LAYER_CASES:
        model = LAYER_TYPES[layer["type"]]
        inferred = {INFERRED[layer["type"]]} if layer["type"] in INFERRED else set()
        assert set(shows) == set(model.model_fields) - {"type"} | inferred, layer


@pytest.mark.parametrize("layer, sample_shape, shows", LAYER_CASES, ids=[case[0]["type"] for case in LAYER_CASES])
def test_each_layer_type_is_the_torch_class_of_that_name_with_the_spec_arguments(tmp_path, layer, sample_shape, shows):
    prepared = prepared_run(tmp_path, image_shape=sample_shape,
                            layers=[layer, {"type": "Flatten"}, {"type": "Linear", "out_features": 1}])
    module = prepared.trainer.module.body[0]

    assert type(module) is getattr(nn, layer["type"])
    assert {name: shown(module, name) for name in shows} == shows
    # The module and the plan (what the API checked and the model card reports) agree on the data.
    x = prepared.data.x_train[:4]
    assert tuple(x.shape[1:]) == (tuple(sample_shape) if sample_shape else (24,))
    assert tuple(module(x).shape) == (4, *prepared.plan.layers[0].output_shape)
    assert sum(p.numel() for p in module.parameters()) == prepared.plan.layers[0].parameters


@pytest.mark.parametrize("sample_shape, layer, field", [
    (IMAGE, {"type": "Conv2d", "out_channels": 4, "kernel_size": [3]}, "kernel_size"),
    (SEQUENCE, {"type": "Conv1d", "out_channels": 4, "kernel_size": [3, 3]}, "kernel_size"),
    (SEQUENCE, {"type": "MaxPool1d", "kernel_size": [2, 2]}, "kernel_size"),
    (SEQUENCE, {"type": "AvgPool1d", "kernel_size": 2, "stride": [1, 1]}, "stride"),
    (IMAGE, {"type": "MaxPool2d", "kernel_size": 2, "dilation": [1]}, "dilation"),
    (IMAGE, {"type": "Conv2d", "out_channels": 4, "kernel_size": 3, "padding": [1]}, "padding"),
])
def test_a_size_list_that_does_not_match_the_layer_s_dimensions_is_refused_naming_it(tmp_path, sample_shape, layer,
                                                                                      field):
    # torch refuses such a list only when the first batch reaches the layer: the spec must, before any queueing.
    with pytest.raises(SpecError) as refused:
        prepared_run(tmp_path, image_shape=sample_shape,
                     layers=[layer, {"type": "Flatten"}, {"type": "Linear", "out_features": 1}])
    assert [problem.path for problem in refused.value.problems] == [f"model.layers[0].{field}"]
    assert "one per dimension" in str(refused.value)


@pytest.mark.parametrize("sample_shape, layer", [
    (SEQUENCE, {"type": "Conv1d", "out_channels": 4, "kernel_size": [3], "stride": [2], "padding": [1]}),
    (IMAGE, {"type": "Conv2d", "out_channels": 4, "kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 0]}),
    (IMAGE, {"type": "MaxPool2d", "kernel_size": [2, 1]}),
])
def test_a_size_list_with_one_size_per_dimension_builds_a_layer_that_runs_as_planned(tmp_path, sample_shape, layer):
    prepared = prepared_run(tmp_path, image_shape=sample_shape,
                            layers=[layer, {"type": "Flatten"}, {"type": "Linear", "out_features": 1}])
    module, planned = prepared.trainer.module.body[0], prepared.plan.layers[0]
    assert tuple(module(prepared.data.x_train[:4]).shape) == (4, *planned.output_shape)
    assert sum(p.numel() for p in module.parameters()) == planned.parameters


# --- losses -------------------------------------------------------------------------------------

# (task, spec loss, what the torch loss shows)
LOSS_CASES = [
    ("regression", {"type": "MSELoss"}, {}),
    ("regression", {"type": "L1Loss"}, {}),
    ("regression", {"type": "HuberLoss", "delta": 2.5}, {"delta": 2.5}),
    ("regression", {"type": "SmoothL1Loss", "beta": 0.5}, {"beta": 0.5}),
    ("binary", {"type": "BCELoss"}, {}),
    ("binary", {"type": "BCEWithLogitsLoss", "pos_weight": 3.0}, {"pos_weight": [3.0]}),
    ("binary", {"type": "BCEWithLogitsLoss"}, {"pos_weight": None}),
    ("multiclass", {"type": "CrossEntropyLoss", "label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5]},
     {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5]}),
    ("multiclass", {"type": "NLLLoss", "weight": [0.25, 1.0, 4.0]}, {"weight": [0.25, 1.0, 4.0]}),
    ("multiclass", {"type": "NLLLoss"}, {"weight": None}),
]


def test_the_loss_cases_cover_every_loss_and_field_the_spec_allows():
    assert unset_fields(LOSS_TYPES, [loss for _task, loss, _shows in LOSS_CASES]) == []
    for _task, loss, shows in LOSS_CASES:
        assert set(shows) == set(LOSS_TYPES[loss["type"]].model_fields) - {"type"}, loss


@pytest.mark.parametrize("task, loss, shows", LOSS_CASES, ids=[case[1]["type"] for case in LOSS_CASES])
def test_each_loss_is_the_torch_class_of_that_name_with_the_spec_arguments(tmp_path, task, loss, shows):
    # BCELoss takes probabilities: the model must end with a Sigmoid (or the spec is refused).
    probabilities = [{"type": "Flatten"}, {"type": "Linear", "out_features": 1}, {"type": "Sigmoid"}]
    layers = probabilities if loss["type"] == "BCELoss" else None
    loss_fn = prepared_run(tmp_path, task=task, loss=loss, layers=layers).trainer.loss_fn
    assert type(loss_fn) is getattr(nn, loss["type"])
    assert {name: shown(loss_fn, name) for name in shows} == shows
    assert loss_fn.reduction == "mean"  # the trainer weights batch means by batch size


@pytest.mark.parametrize("task, default", [("regression", nn.MSELoss), ("binary", nn.BCEWithLogitsLoss),
                                           ("multiclass", nn.CrossEntropyLoss)])
def test_a_spec_without_a_loss_trains_with_the_default_loss_of_its_task(tmp_path, task, default):
    loss_fn = prepared_run(tmp_path, task=task).trainer.loss_fn
    assert type(loss_fn) is default
    assert vars(loss_fn) == vars(default())


# --- optimizers ---------------------------------------------------------------------------------

# (spec optimizer, what its one param group holds)
OPTIMIZER_CASES = [
    ({"type": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01, "nesterov": True}),
    ({"type": "SGD", "lr": 0.02, "momentum": 0.5, "dampening": 0.1},
     {"lr": 0.02, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.0, "nesterov": False}),
    ({"type": "Adam", "lr": 0.002, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.01, "amsgrad": True},
     {"lr": 0.002, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.01, "amsgrad": True}),
    ({"type": "AdamW", "lr": 0.003, "betas": [0.85, 0.995], "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True},
     {"lr": 0.003, "betas": (0.85, 0.995), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True}),
    ({"type": "AdamW"},  # AdamW's own default weight decay, not Adam's 0
     {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False}),
    ({"type": "RMSprop", "lr": 0.004, "alpha": 0.9, "eps": 1e-7, "weight_decay": 0.001, "momentum": 0.5,
      "centered": True},
     {"lr": 0.004, "alpha": 0.9, "eps": 1e-7, "weight_decay": 0.001, "momentum": 0.5, "centered": True}),
    ({"type": "Adagrad", "lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.001, "initial_accumulator_value": 0.1,
      "eps": 1e-9},
     {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.001, "initial_accumulator_value": 0.1, "eps": 1e-9}),
    ({"type": "Adadelta", "lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.001},
     {"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.001}),
]


def test_the_optimizer_cases_cover_every_optimizer_and_field_the_spec_allows():
    assert unset_fields(OPTIMIZER_TYPES, [optimizer for optimizer, _group in OPTIMIZER_CASES]) == []
    for optimizer, group in OPTIMIZER_CASES:
        assert set(group) == set(OPTIMIZER_TYPES[optimizer["type"]].model_fields) - {"type"}, optimizer


@pytest.mark.parametrize("optimizer, group", OPTIMIZER_CASES, ids=[case[0]["type"] for case in OPTIMIZER_CASES])
def test_each_optimizer_is_the_torch_class_of_that_name_with_the_spec_hyperparameters(tmp_path, optimizer, group):
    trainer = prepared_run(tmp_path, optimizer=optimizer).trainer
    assert type(trainer.optimizer) is getattr(torch.optim, optimizer["type"])
    [param_group] = trainer.optimizer.param_groups
    assert {name: param_group[name] for name in group} == group
    # It steps every parameter of the network, and the network's own tensors (not copies).
    assert [id(p) for p in param_group["params"]] == [id(p) for p in trainer.module.parameters()]


@pytest.mark.parametrize("optimizer_type", sorted(OPTIMIZER_TYPES))
def test_each_optimizer_uses_fused_kernels_on_the_cpu_where_torch_has_them_and_the_for_loop_elsewhere(
        tmp_path, optimizer_type):
    trainer = prepared_run(tmp_path, optimizer={"type": optimizer_type}).trainer
    [param_group] = trainer.optimizer.param_groups
    has_fused = "fused" in inspect.signature(getattr(torch.optim, optimizer_type)).parameters
    assert (param_group.get("fused") is True) == has_fused  # every optimizer torch fuses on the CPU is fused
    assert param_group["foreach"] in (None, False)
    trainer.fit()  # and the kernel runs
    assert trainer.state.epoch == EPOCHS


def test_on_cuda_optimizers_without_a_fused_kernel_use_foreach_and_on_mps_the_for_loop():
    assert optimizer_kernels("Adam", torch.device("cuda")) == {"fused": True}
    assert optimizer_kernels("RMSprop", torch.device("cuda")) == {"foreach": True}
    assert optimizer_kernels("Adam", torch.device("mps")) == {"foreach": False}  # MPS's fused Adam: a prototype


# --- schedulers ---------------------------------------------------------------------------------

# (spec scheduler, the torch keyword arguments it must come to)
SCHEDULER_CASES = [
    ({"type": "StepLR", "step_size": 3, "gamma": 0.5}, {"step_size": 3, "gamma": 0.5}),
    ({"type": "MultiStepLR", "milestones": [2, 5], "gamma": 0.2}, {"milestones": [2, 5], "gamma": 0.2}),
    ({"type": "ExponentialLR", "gamma": 0.9}, {"gamma": 0.9}),
    ({"type": "CosineAnnealingLR", "T_max": 7, "eta_min": 0.001}, {"T_max": 7, "eta_min": 0.001}),
    ({"type": "ReduceLROnPlateau", "monitor": "loss", "mode": "max", "factor": 0.5, "patience": 2,
      "threshold": 0.01, "threshold_mode": "abs", "cooldown": 1, "min_lr": 0.001, "eps": 1e-6},
     {"mode": "max", "factor": 0.5, "patience": 2, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 1,
      "min_lr": 0.001, "eps": 1e-6}),
    ({"type": "OneCycleLR", "max_lr": 0.2, "pct_start": 0.25, "anneal_strategy": "linear", "div_factor": 10.0,
      "final_div_factor": 100.0, "three_phase": True},
     {"max_lr": 0.2, "pct_start": 0.25, "anneal_strategy": "linear", "div_factor": 10.0, "final_div_factor": 100.0,
      "three_phase": True, "total_steps": EPOCHS * STEPS_PER_EPOCH}),
]
# Spec fields that are not torch arguments: the trainer reads them.
NOT_TORCH_ARGUMENTS = {"type", "monitor"}


def test_the_scheduler_cases_cover_every_scheduler_and_field_the_spec_allows():
    assert unset_fields(SCHEDULER_TYPES, [scheduler for scheduler, _kwargs in SCHEDULER_CASES]) == []
    for scheduler, kwargs in SCHEDULER_CASES:
        fields = set(SCHEDULER_TYPES[scheduler["type"]].model_fields) - NOT_TORCH_ARGUMENTS
        assert set(kwargs) - {"total_steps"} == fields, scheduler


def without_params(groups: list[dict]) -> list[dict]:
    return [{key: value for key, value in group.items() if key != "params"} for group in groups]


@pytest.mark.parametrize("scheduler, kwargs", SCHEDULER_CASES, ids=[case[0]["type"] for case in SCHEDULER_CASES])
def test_each_scheduler_is_the_torch_class_of_that_name_with_the_spec_arguments(tmp_path, scheduler, kwargs):
    trainer = prepared_run(tmp_path, scheduler=scheduler, optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9}).trainer
    torch_class = getattr(lr_scheduler, scheduler["type"])
    reference_optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9, fused=True)
    reference = torch_class(reference_optimizer, **kwargs)

    assert type(trainer.scheduler) is torch_class
    assert trainer.scheduler.optimizer is trainer.optimizer
    # Every setting the scheduler keeps, and every one it writes into the optimizer, as torch's own call gives.
    assert trainer.scheduler.state_dict() == reference.state_dict()
    assert without_params(trainer.optimizer.param_groups) == without_params(reference_optimizer.param_groups)


def test_the_scheduler_state_holds_the_spec_values_where_torch_keeps_them(tmp_path):
    # The comparison above against torch's own call, spelled out for the arguments torch stores elsewhere.
    step = prepared_run(tmp_path / "step", scheduler={"type": "MultiStepLR", "milestones": [2, 5]}).trainer.scheduler
    plateau = prepared_run(tmp_path / "plateau", scheduler={"type": "ReduceLROnPlateau", "min_lr": 0.001}).trainer
    cycle = prepared_run(tmp_path / "cycle", scheduler={"type": "OneCycleLR", "max_lr": 0.2, "div_factor": 10.0,
                                                        "final_div_factor": 100.0}).trainer
    assert step.milestones == Counter({2: 1, 5: 1})
    assert plateau.scheduler.min_lrs == [0.001]
    [group] = cycle.optimizer.param_groups
    assert (cycle.scheduler.total_steps, group["max_lr"], group["initial_lr"], group["min_lr"]) == pytest.approx(
        (EPOCHS * STEPS_PER_EPOCH, 0.2, 0.02, 0.0002), rel=1e-12)
    assert group["lr"] == pytest.approx(0.02, rel=1e-12)  # the first step's rate: max_lr / div_factor


@pytest.mark.parametrize("monitor", ["loss", "val_loss", "val_r2"])
def test_reduce_lr_on_plateau_steps_on_the_metric_its_monitor_names(tmp_path, monitor):
    trainer = prepared_run(tmp_path, scheduler={"type": "ReduceLROnPlateau", "monitor": monitor}).trainer
    metrics = {"loss": 3.0, "mae": 1.5, "r2": 0.25, "val_loss": 7.0, "val_mae": 2.5, "val_r2": -0.5, "lr": 0.001}
    trainer.step_scheduler(metrics)
    assert trainer.scheduler.best == metrics[monitor]
