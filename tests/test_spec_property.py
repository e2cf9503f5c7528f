"""Accepted means runnable: every spec the validator accepts trains an epoch, every refusal names its field.

Hypothesis draws specs from everything a spec may hold: every layer with its arguments, every loss,
optimizer and scheduler, the scikit-learn generators and bundled sets with their arguments (tiny sizes),
tasks, validation splits, batch sizes and early stopping. Most draws are runnable and some are not; the
validator must tell which, before anything is queued. CI runs a fixed set of examples
(``HYPOTHESIS_PROFILE=ci``, the default); ``HYPOTHESIS_PROFILE=thorough`` runs thousands of fresh ones.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models.catalog import SKLEARN_DATASETS
from models.spec import SpecError
from models.validation import parse_spec
from worker.engine import train
from worker.engine.data import load_arrays

PROFILES = {
    # Deterministic and quick enough for a busy 2-core CI machine.
    "ci": settings(max_examples=150, derandomize=True, deadline=None, database=None, print_blob=True,
                   suppress_health_check=list(HealthCheck)),
    # For a person hunting for classes of unrunnable specs: new examples each run.
    "thorough": settings(max_examples=3000, deadline=None, database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck)),
}
PROFILE = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), PROFILES["ci"])


def maybe(**fields) -> st.SearchStrategy[dict]:
    """A dict holding any subset of ``fields``: an argument left out takes its default."""
    return st.fixed_dictionaries({}, optional=fields)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    """``common``, and ``rare`` about one time in ``one_in`` (Hypothesis leans to small numbers: 0 is common)."""
    return st.integers(0, one_in - 1).flatmap(lambda roll: rare if roll == one_in - 1 else common)


def chance(draw, one_in: int) -> bool:
    """True about one time in ``one_in``."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


small = st.integers(1, 4)
unit = st.floats(0, 1)
seeds = mostly(st.integers(0, 2**32 - 1), st.sampled_from([2**32, 2**40, -1]))  # some past scikit-learn's range


def sizes(low: int, high: int, rank: int = 2) -> st.SearchStrategy:
    """One number, or one per dimension; now and then a list of the wrong length."""
    number = st.integers(low, high)
    return mostly(number | st.lists(number, min_size=rank, max_size=rank), st.lists(number, min_size=1, max_size=3),
                  one_in=20)


# --- layers ---------------------------------------------------------------------------------------

def conv(kind: str) -> st.SearchStrategy[dict]:
    """Conv1d or Conv2d with any of its arguments."""
    rank = 1 if kind.endswith("1d") else 2
    return st.builds(lambda required, extra: {"type": kind, **required, **extra},
                     st.fixed_dictionaries({"out_channels": small, "kernel_size": sizes(1, 3, rank)}),
                     maybe(stride=sizes(1, 2, rank), padding=sizes(0, 3, rank) | st.sampled_from(["same", "valid"]),
                           dilation=sizes(1, 2, rank), groups=st.integers(1, 2), bias=st.booleans(),
                           padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"])))


def pool(kind: str) -> st.SearchStrategy[dict]:
    """A max or average pooling layer with any of its arguments."""
    rank = 1 if kind.endswith("1d") else 2
    extra = maybe(stride=sizes(1, 2, rank), padding=sizes(0, 1, rank), ceil_mode=st.booleans())
    more = maybe(dilation=sizes(1, 2, rank)) if kind.startswith("Max") else maybe(count_include_pad=st.booleans())
    return st.builds(lambda kernel, extra, more: {"type": kind, "kernel_size": kernel, **extra, **more},
                     sizes(1, 3, rank), extra, more)


def simple(kind: str, **fields) -> st.SearchStrategy[dict]:
    """A part of type ``kind`` with any subset of ``fields``."""
    return maybe(**fields).map(lambda extra: {"type": kind, **extra})


def batch_norm(kind: str) -> st.SearchStrategy[dict]:
    """BatchNorm1d or BatchNorm2d with any of its arguments."""
    return simple(kind, eps=st.floats(1e-6, 1e-2), momentum=st.none() | unit, affine=st.booleans(),
                  track_running_stats=st.booleans())


LINEAR = st.builds(lambda n, extra: {"type": "Linear", "out_features": n, **extra}, small, maybe(bias=st.booleans()))
ANYWHERE = st.one_of(  # layers that take any input
    simple("Dropout", p=st.floats(0, 0.9)),
    simple("LayerNorm", eps=st.floats(1e-6, 1e-2), elementwise_affine=st.booleans(), bias=st.booleans()),
    simple("ReLU"), simple("Sigmoid"), simple("Tanh"), simple("SELU"), simple("Identity"),
    simple("LeakyReLU", negative_slope=unit),
    simple("Softmax", dim=st.integers(-3, 3)), simple("LogSoftmax", dim=st.integers(-3, 3)),
    simple("Softplus", beta=st.floats(0.5, 5), threshold=st.floats(1, 30)),
    simple("GELU", approximate=st.sampled_from(["none", "tanh"])),
    simple("ELU", alpha=st.floats(0.1, 2)),
    simple("Flatten", start_dim=st.integers(-4, 4), end_dim=st.integers(-4, 4)),
)
# The layers made for an input of each rank per sample (features; channels x length; channels x H x W).
MADE_FOR = {
    1: st.one_of(LINEAR, batch_norm("BatchNorm1d")),
    2: st.one_of(conv("Conv1d"), pool("MaxPool1d"), pool("AvgPool1d"), batch_norm("BatchNorm1d")),
    3: st.one_of(conv("Conv2d"), pool("MaxPool2d"), pool("AvgPool2d"), batch_norm("BatchNorm2d")),
}
LAYERS = st.one_of(*MADE_FOR.values(), ANYWHERE)


def fitting(rank: int) -> st.SearchStrategy[dict]:
    """Mostly a layer made for the input's rank, else one that takes any input, now and then any layer."""
    return st.integers(0, 9).flatmap(lambda roll: MADE_FOR[rank] if roll < 6 else ANYWHERE if roll < 9 else LAYERS)


# What a loss wants the model to end with.
ENDINGS = {"BCELoss": [{"type": "Sigmoid"}], "NLLLoss": [{"type": "LogSoftmax"}]}


@st.composite
def networks(draw, rank: int, n_outputs: int, loss: str | None) -> list[dict]:
    """Layers that (mostly) fit an input of ``rank``, a Flatten, a Linear of the width the data needs and
    (mostly) the ending the loss wants; now and then a layer of any kind or a wrong width."""
    body = draw(st.lists(fitting(rank), max_size=4))
    head = [] if chance(draw, 6) else [{"type": "Flatten"}]
    width = draw(small) if chance(draw, 10) else n_outputs
    ending = draw(st.sampled_from(list(ENDINGS.values()))) if chance(draw, 6) else ENDINGS.get(loss, [])
    return body + head + draw(st.lists(LINEAR | ANYWHERE, max_size=2)) + [{"type": "Linear", "out_features": width}] \
        + ending


# --- data -----------------------------------------------------------------------------------------

n_samples = st.integers(1, 60)
noise = mostly(st.floats(0, 0.5), st.floats(-0.5, -0.01))
GENERATORS = {
    "make_classification": maybe(
        n_samples=n_samples, n_features=st.integers(1, 16), n_informative=small, n_redundant=st.integers(0, 2),
        n_repeated=st.integers(0, 1), n_classes=small, n_clusters_per_class=st.integers(1, 2), flip_y=unit,
        class_sep=st.floats(0.1, 2), hypercube=st.booleans(),
        shift=mostly(st.floats(-1, 1), st.lists(st.floats(-1, 1), min_size=1, max_size=8)),
        scale=st.floats(0.5, 2), shuffle=st.booleans(),
        random_state=seeds),
    "make_regression": maybe(
        n_samples=n_samples, n_features=st.integers(1, 16), n_informative=st.integers(0, 8), n_targets=small,
        bias=st.floats(-1, 1), effective_rank=st.none() | small, tail_strength=unit,
        noise=noise, shuffle=st.booleans(), random_state=seeds),
    "make_circles": maybe(n_samples=n_samples, noise=st.none() | noise,
                          factor=mostly(st.floats(0, 0.99), st.floats(1, 1.2)), shuffle=st.booleans(),
                          random_state=seeds),
    "make_moons": maybe(n_samples=n_samples, noise=st.none() | noise, shuffle=st.booleans(),
                        random_state=seeds),
    "make_blobs": maybe(
        n_samples=n_samples, n_features=st.integers(1, 16),
        centers=st.integers(1, 5) | st.lists(st.floats(-5, 5), min_size=1, max_size=4),
        cluster_std=st.floats(0.1, 2) | st.lists(st.floats(0.1, 2), min_size=1, max_size=5),
        center_box=st.lists(st.floats(-10, 10), min_size=1, max_size=3), shuffle=st.booleans(),
        random_state=seeds),
    "load_digits": maybe(n_class=st.integers(1, 11)),
    "load_iris": st.just({}), "load_wine": st.just({}), "load_breast_cancer": st.just({}), "load_diabetes": st.just({}),
}
# Every generator gets a random_state, so that an example trains on the same data each time it runs.
REPRODUCIBLE = {name for name, entry in SKLEARN_DATASETS.items() if "random_state" in entry.params}


@st.composite
def image_shapes(draw, n_features: int) -> list[int] | None:
    """A C x L or C x H x W reading of the features, or none, or (now and then) a wrong one."""
    choice = draw(st.integers(0, 9))  # mostly a reading of the features, else none, now and then a wrong one
    if choice == 9:
        return draw(st.lists(small, min_size=2, max_size=3))
    if choice >= 5:
        return None
    channels = draw(st.sampled_from([d for d in range(1, n_features + 1) if n_features % d == 0]))
    rest = n_features // channels
    if draw(st.booleans()):
        return [channels, rest]
    height = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
    return [channels, height, rest // height]


def fitting_task(name: str, params: dict) -> str:
    """The task the data most likely fits, for the draw to aim at (the validator judges)."""
    classes = SKLEARN_DATASETS[name].shape(params).n_classes
    return "regression" if classes is None else "binary" if classes == 2 else "multiclass"


def outputs_needed(task: str, name: str, params: dict) -> int:
    """The width a network's last layer needs on this data, for the draw to aim at (the validator judges)."""
    shape = SKLEARN_DATASETS[name].shape(params)
    if task == "regression":
        return shape.n_targets if isinstance(shape.n_targets, int) else 1
    if task == "binary":
        return 1
    return shape.n_classes if isinstance(shape.n_classes, int) and shape.n_classes > 0 else 3


# --- the rest -------------------------------------------------------------------------------------

TASK_LOSSES = {
    "regression": st.one_of(simple("MSELoss"), simple("L1Loss"), simple("HuberLoss", delta=st.floats(0.1, 2)),
                            simple("SmoothL1Loss", beta=st.floats(0, 2))),
    "binary": st.one_of(simple("BCELoss"), simple("BCEWithLogitsLoss", pos_weight=st.none() | st.floats(0.1, 5))),
    "multiclass": st.one_of(simple("CrossEntropyLoss", label_smoothing=st.floats(0, 0.5)), simple("NLLLoss")),
}
LOSSES = st.one_of(*TASK_LOSSES.values())
lr = st.floats(1e-4, 0.3)
decay = st.floats(0, 0.1)
OPTIMIZERS = st.one_of(
    simple("SGD", lr=lr, momentum=st.floats(0, 0.9), dampening=st.floats(0, 0.5), weight_decay=decay,
           nesterov=mostly(st.just(False), st.just(True))),
    simple("Adam", lr=lr, betas=st.lists(st.floats(0, 0.999), min_size=2, max_size=2), eps=st.floats(1e-9, 1e-6),
           weight_decay=decay, amsgrad=st.booleans()),
    simple("AdamW", lr=lr, weight_decay=decay, amsgrad=st.booleans()),
    simple("RMSprop", lr=lr, alpha=st.floats(0.5, 0.99), momentum=st.floats(0, 0.9), weight_decay=decay,
           centered=st.booleans()),
    simple("Adagrad", lr=lr, lr_decay=decay, weight_decay=decay, initial_accumulator_value=unit),
    simple("Adadelta", lr=st.floats(0.1, 1), rho=st.floats(0.5, 0.99), weight_decay=decay),
)
METRICS = ["loss", "val_loss", "accuracy", "val_accuracy", "mae", "val_mae", "r2", "val_r2", "lr",
           "samples_per_second", "val_acc"]


def monitors(task: str, validated: bool) -> st.SearchStrategy[str]:
    """Mostly a metric the job records, now and then one it doesn't."""
    base = ["loss", "accuracy"] if task != "regression" else ["loss", "mae", "r2"]
    recorded = base + [f"val_{name}" for name in base if validated] + ["lr", "samples_per_second"]
    return mostly(st.sampled_from(recorded), st.sampled_from(METRICS))


# Some that put a phase of a short cycle on one step (PyTorch divides by zero there).
PCT_START = st.sampled_from([0.02, 0.1, 0.25, 0.5, 0.51]) | st.floats(0.01, 0.99)
gamma = mostly(st.floats(0.01, 1), st.just(0.0))


def schedulers(monitor: st.SearchStrategy[str]) -> st.SearchStrategy[dict | None]:
    """None, or any scheduler with its arguments (ReduceLROnPlateau watching ``monitor``)."""
    return st.none() | st.one_of(
        st.builds(lambda n, extra: {"type": "StepLR", "step_size": n, **extra}, small, maybe(gamma=gamma)),
        st.builds(lambda ms, extra: {"type": "MultiStepLR", "milestones": ms, **extra},
                  st.lists(small, min_size=1, max_size=3), maybe(gamma=gamma)),
        st.floats(0.5, 1.5).map(lambda gamma: {"type": "ExponentialLR", "gamma": gamma}),
        st.builds(lambda t, extra: {"type": "CosineAnnealingLR", "T_max": t, **extra}, small,
                  maybe(eta_min=st.floats(0, 1e-3))),
        simple("ReduceLROnPlateau", monitor=monitor, mode=st.sampled_from(["min", "max"]),
               factor=st.floats(0.1, 0.9), patience=st.integers(0, 3), threshold_mode=st.sampled_from(["rel", "abs"]),
               cooldown=st.integers(0, 2), min_lr=st.floats(0, 1e-4)),
        st.builds(lambda top, extra: {"type": "OneCycleLR", "max_lr": top, **extra}, st.floats(1e-3, 0.3),
                  maybe(pct_start=PCT_START, anneal_strategy=st.sampled_from(["cos", "linear"]),
                        div_factor=st.floats(2, 50), final_div_factor=st.floats(10, 1e4),
                        three_phase=st.booleans())),
    )


def early_stopping(monitor: st.SearchStrategy[str]) -> st.SearchStrategy[dict | None]:
    """None, or Keras' early stopping watching ``monitor``."""
    return st.none() | maybe(
        monitor=monitor, mode=st.sampled_from(["min", "max", "auto"]), min_delta=st.floats(0, 0.1),
        patience=st.integers(0, 3), baseline=st.none() | st.floats(-1, 1), restore_best_weights=st.booleans(),
        start_from_epoch=st.integers(0, 2))


BATCH_SIZES = st.integers(1, 64) | st.sampled_from([200, 1_000_000])
SPLITS = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 0.9]) | st.floats(0, 0.9)


@st.composite
def specs(draw) -> dict:
    """A job spec from everything a spec may hold: mostly runnable, some not."""
    name = draw(st.sampled_from(sorted(GENERATORS)))
    params = draw(GENERATORS[name])
    if name in REPRODUCIBLE:
        params.setdefault("random_state", draw(st.integers(0, 2**32 - 1)))
    tasks = ["regression", "binary", "multiclass"]
    task = draw(st.sampled_from(tasks)) if chance(draw, 5) else fitting_task(name, params)
    shape = SKLEARN_DATASETS[name].shape(params)
    n_features = shape.n_features if isinstance(shape.n_features, int) else 2
    data = {"source": "sklearn", "name": name, "params": params,
            **draw(maybe(validation_split=SPLITS, standardize=st.booleans()))}
    image_shape = draw(image_shapes(n_features))
    if image_shape:
        data["image_shape"] = image_shape
    monitor = monitors(task, data.get("validation_split", 0.2) > 0)
    roll = draw(st.integers(0, 9))  # mostly a loss that fits the task or the task's default
    loss = draw(TASK_LOSSES[task]) if roll < 6 else None if roll < 9 else draw(LOSSES)
    layers = networks(len(image_shape) if image_shape else 1, outputs_needed(task, name, params),
                      loss and loss["type"])
    spec = {
        "task": task,
        "seed": draw(st.integers(0, 2**63 - 1)),
        "data": data,
        "model": {"layers": draw(layers)},
        "optimizer": draw(OPTIMIZERS),
        "training": {"epochs": 1, "batch_size": draw(BATCH_SIZES), "shuffle": draw(st.booleans())},
        "resources": {"device": "cpu"},
        "loss": loss,
        "scheduler": draw(schedulers(monitor)),
        "early_stopping": draw(early_stopping(monitor)),
    }
    return {key: value for key, value in spec.items() if value is not None}


@PROFILE
@given(spec=specs())
def test_every_spec_the_validator_accepts_trains_an_epoch_and_every_refusal_names_its_field(spec):
    try:
        parsed = parse_spec(spec)
    except SpecError as refused:
        assert refused.problems
        assert all(problem.path for problem in refused.problems), refused
        event("refused")  # how many of each: pytest --hypothesis-show-statistics
        return
    event("accepted")
    # The catalog's shapes, which the API checks networks against, are the data the engine loads.
    expected = SKLEARN_DATASETS[parsed.data.name].shape(parsed.data.params)
    arrays = load_arrays(parsed)
    assert (len(arrays.X), math.prod(arrays.X.shape[1:])) == (expected.n_samples, expected.n_features)
    assert (arrays.y.shape[1] if arrays.y.ndim > 1 else 1) == expected.n_targets
    if expected.n_classes is not None:
        assert len(np.unique(arrays.y)) <= expected.n_classes
    with tempfile.TemporaryDirectory() as out:
        result = train(parsed, Path(out), device="cpu")
    # A run that diverges fails saying so; that is training's outcome, not an unrunnable spec.
    assert result.status == "succeeded" or "loss became" in (result.error or ""), result.error
    assert result.epochs_completed == 1 or result.status == "failed"


def test_a_generated_sample_that_happens_to_lack_its_last_class_still_trains(tmp_path):
    # flip_y relabels half of the 8 samples at random; with this seed none keeps class 3 (each class had 2).
    spec = parse_spec({
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0,
                 "params": {"n_samples": 8, "n_classes": 4, "n_informative": 2, "n_clusters_per_class": 1,
                            "flip_y": 0.5, "random_state": 10}},
        "model": {"layers": [{"type": "Linear", "out_features": 4}]},
        "training": {"epochs": 1},
    })
    assert train(spec, tmp_path, device="cpu").status == "succeeded"


def test_a_single_generated_sample_trains(tmp_path):
    spec = parse_spec({
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression", "validation_split": 0,
                 "params": {"n_samples": 1, "n_features": 3, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 1}]},
        "training": {"epochs": 1},
    })
    assert train(spec, tmp_path, device="cpu").status == "succeeded"
