"""A sweep request (models.sweep_spec): paths resolved against the base, trials sampled deterministically and
each checked like a job, every refusal at a field path that says what is wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from models.spec import Limits, SpecError
from models.sweep_spec import (
    MAX_CHOICES,
    MAX_PARALLELISM,
    MAX_SPACE_PATHS,
    MAX_TRIALS,
    asha_rungs,
    parse_sweep,
    trial_spec,
)
from models.validation import parse_service_spec
from tests.specs import blobs_spec

LIMITS = Limits()


def digits_base(**changes) -> dict:
    """A digits classifier whose first layer is a Linear (the issue's example searches its out_features)."""
    spec = {
        "name": "digits-mlp",
        "seed": 0,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "load_digits", "validation_split": 0.2, "standardize": True},
        "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 10}]},
        "optimizer": {"type": "Adam", "lr": 0.01},
        "training": {"epochs": 10, "batch_size": 64},
    }
    return {**spec, **changes}


ISSUE_EXAMPLE = {
    "name": "digits-search",
    "base": digits_base(),
    "space": {"optimizer.lr": {"log_uniform": [0.001, 0.1]},
              "model.layers[0].out_features": {"choice": [16, 32, 64]}},
    "method": "random", "trials": 9, "parallelism": 3, "metric": "val_accuracy", "mode": "max",
    "scheduler": {"type": "asha", "min_epochs": 2, "max_epochs": 18, "reduction_factor": 3},
}


def request(**changes) -> dict:
    return {**copy.deepcopy(ISSUE_EXAMPLE), **changes}


def problems_of(body, limits: Limits = LIMITS) -> dict[str, str]:
    """The problems parse_sweep finds, by path (each path once)."""
    with pytest.raises(SpecError) as caught:
        parse_sweep(body, limits)
    found = {problem.path: problem.message for problem in caught.value.problems}
    assert len(found) == len(caught.value.problems), caught.value.problems
    return found


def test_the_issues_example_request_is_planned():
    planned = parse_sweep(request(), LIMITS)

    assert planned.rungs == [2, 6, 18]
    assert (planned.metric, planned.mode) == ("val_accuracy", "max")
    assert planned.base["training"]["epochs"] == 18  # ASHA trains every trial up to max_epochs
    assert len(planned.trials) == 9
    for params in planned.trials:
        assert list(params) == ["optimizer.lr", "model.layers[0].out_features"]
        assert 0.001 <= params["optimizer.lr"] <= 0.1
        assert params["model.layers[0].out_features"] in (16, 32, 64)
        spec = parse_service_spec(trial_spec(planned.base, params), LIMITS)  # every trial is a job
        assert spec.optimizer.lr == params["optimizer.lr"] and spec.training.epochs == 18
        assert spec.model.layers[0].out_features == params["model.layers[0].out_features"]
    assert planned.request == json.loads(json.dumps(planned.request))  # JSON, as stored
    assert {key: planned.request[key] for key in ("name", "method", "trials", "parallelism", "metric", "mode",
                                                  "seed", "scheduler", "space")} == {
        "name": "digits-search", "method": "random", "trials": 9, "parallelism": 3, "metric": "val_accuracy",
        "mode": "max", "seed": 0, "space": ISSUE_EXAMPLE["space"],
        "scheduler": {"type": "asha", "min_epochs": 2, "max_epochs": 18, "reduction_factor": 3}}
    # The request keeps the base as the user's job would run it (defaults filled in, epochs as asked).
    assert planned.request["base"] == parse_service_spec(digits_base(), LIMITS).model_dump(mode="json")


def test_random_trials_are_the_same_for_a_seed_and_differ_across_seeds():
    first = parse_sweep(request(seed=7), LIMITS).trials

    assert parse_sweep(request(seed=7), LIMITS).trials == first
    other = parse_sweep(request(seed=8), LIMITS).trials
    assert [t["optimizer.lr"] for t in other] != [t["optimizer.lr"] for t in first]
    # The default seed is 0, and a seed's values spread over the domain rather than repeat one.
    assert parse_sweep(request(), LIMITS).trials == parse_sweep(request(seed=0), LIMITS).trials
    assert len({t["optimizer.lr"] for t in first}) == 9


def test_each_domain_samples_within_its_bounds():
    planned = parse_sweep(request(scheduler=None, trials=50, space={
        "optimizer.lr": {"uniform": [0.01, 0.02]},
        "optimizer.eps": {"log_uniform": [1e-9, 1e-6]},
        "model.layers[0].out_features": {"int_uniform": [4, 6]},
        "training.batch_size": {"choice": [32, 64]},
    }), LIMITS)

    assert all(0.01 <= t["optimizer.lr"] <= 0.02 for t in planned.trials)
    assert all(1e-9 <= t["optimizer.eps"] <= 1e-6 for t in planned.trials)
    # log_uniform: a draw below the geometric middle (3.2e-8) is as likely as one above it.
    assert 10 <= sum(t["optimizer.eps"] < 10**-7.5 for t in planned.trials) <= 40
    assert {t["model.layers[0].out_features"] for t in planned.trials} == {4, 5, 6}  # both ends included
    assert {t["training.batch_size"] for t in planned.trials} == {32, 64}
    assert planned.rungs == [] and planned.base["training"]["epochs"] == 10


def test_grid_is_the_cartesian_product_in_an_order_shuffled_by_the_seed():
    space = {"training.batch_size": {"choice": [32, 64]},
             "model.layers[1]": {"choice": [{"type": "ReLU"}, {"type": "Tanh"}, {"type": "GELU"}]}}
    planned = parse_sweep(request(method="grid", trials=None, space=space), LIMITS)

    product = [{"training.batch_size": batch, "model.layers[1]": {"type": act}}
               for batch in (32, 64) for act in ("ReLU", "Tanh", "GELU")]
    assert sorted(map(repr, planned.trials)) == sorted(map(repr, product))
    assert planned.trials != product  # shuffled (for seed 0), so ASHA's first rung sees a fair sample
    assert planned.trials == parse_sweep(request(method="grid", trials=None, space=space), LIMITS).trials
    assert planned.trials != parse_sweep(request(method="grid", trials=None, space=space, seed=1), LIMITS).trials
    assert planned.request["trials"] == 6  # filled in
    tanh = planned.trials.index({"training.batch_size": 64, "model.layers[1]": {"type": "Tanh"}})
    assert trial_spec(planned.base, planned.trials[tanh])["model"]["layers"][1] == {"type": "Tanh"}


def test_grid_takes_only_choices_its_own_size_and_at_most_max_trials():
    assert problems_of(request(method="grid", trials=None)) == {
        "space.optimizer.lr": "method 'grid' takes only choice domains, not log_uniform; list the values, or use "
                              "method 'random'"}
    choices = {"model.layers[0].out_features": {"choice": [16, 32, 64]}}
    assert problems_of(request(method="grid", trials=9, space=choices)) == {
        "trials": "the grid has 3 combinations; give trials 3 or leave it out"}
    assert {"model.layers[0].out_features": 64} in parse_sweep(request(method="grid", trials=3, space=choices),
                                                               LIMITS).trials
    wide = {"model.layers[0].out_features": {"choice": list(range(1, 101))},
            "training.batch_size": {"choice": [16, 32, 64]}}
    assert problems_of(request(method="grid", trials=None, space=wide)) == {
        "space": f"the grid has 300 combinations, more than the limit of {MAX_TRIALS} trials (MAX_TRIALS)"}


def test_random_needs_a_number_of_trials():
    assert problems_of(request(trials=None)) == {"trials": "required for method 'random'"}


@pytest.mark.parametrize("path, message", [
    ("optimizer.lrr", "no field 'lrr' in the base spec's optimizer (did you mean 'lr'?); it has: type, lr, betas, "
                      "eps, weight_decay, amsgrad"),
    ("optimiser.lr", "no field 'optimiser' in the base spec (did you mean 'optimizer'?); it has: name, seed, "
                     "priority, tags, experiment, task, data, model, loss, optimizer, scheduler, training, "
                     "early_stopping, checkpoint, resources"),
    ("model.layers[3].out_features", "no item [3] in the base spec's model.layers: it has 3, [0] to [2]"),
    ("model.layers[1].out_features", "no field 'out_features' in the base spec's model.layers[1]; it has: type"),
    ("optimizer.lr.value", "the base spec's optimizer.lr is a number, not an object with fields"),
    ("scheduler.T_max", "the base spec's scheduler is null, not an object with fields: set it in the base to "
                        "search what is in it"),
    ("optimizer[0]", "the base spec's optimizer is an object, not a list: [0] names nothing"),
    ("tags[0]", "no item [0] in the base spec's tags: it is empty"),
    ("model.layers[01]", "not a path: names joined by dots, with [i] for a list's item, e.g. "
                         "model.layers[0].out_features"),
    ("optimizer..lr", "not a path: names joined by dots, with [i] for a list's item, e.g. "
                      "model.layers[0].out_features"),
])
def test_a_path_the_base_lacks_is_refused_naming_what_exists(path, message):
    assert problems_of(request(space={path: {"choice": [1, 2]}})) == {f"space.{path}": message}


def test_paths_resolve_against_the_base_with_its_defaults_filled_in():
    # The base never wrote optimizer.weight_decay or training.shuffle: their defaults are there to search.
    planned = parse_sweep(request(space={"optimizer.weight_decay": {"uniform": [0.0, 0.1]},
                                         "training.shuffle": {"choice": [True, False]}}), LIMITS)

    assert {t["training.shuffle"] for t in planned.trials} == {True, False}


def test_a_trial_the_job_gate_refuses_names_the_trial_the_path_and_the_value():
    space = {"training.batch_size": {"choice": [32, 64]}, "model.layers[0].out_features": {"choice": [16, 0]}}

    refused = problems_of(request(method="grid", trials=None, space=space))
    # The same grid with 1 for 0 is valid, and in the same order: its first trial with 1 is the one named.
    valid = {**space, "model.layers[0].out_features": {"choice": [16, 1]}}
    trials = parse_sweep(request(method="grid", trials=None, space=valid), LIMITS).trials
    number = min(i for i, trial in enumerate(trials) if trial["model.layers[0].out_features"] == 1)
    assert refused == {
        "space.model.layers[0].out_features": f"trial {number} with model.layers[0].out_features = 0: Input should "
                                              "be greater than or equal to 1"}
    lr = {"optimizer.lr": {"choice": [0.01, 1e300]}}
    assert problems_of(request(method="grid", trials=None, space=lr)) == {
        "space.optimizer.lr": "trial 1 with optimizer.lr = 1e+300: must be within float32's range (±3.403e+38), "
                              "as the engine trains in float32, not 1e+300"}


def test_a_random_trial_the_job_gate_refuses_is_found_among_the_sampled():
    space = {"model.layers[0].out_features": {"int_uniform": [0, 3]}}
    planned = parse_sweep(request(space={"model.layers[0].out_features": {"int_uniform": [1, 3]}}), LIMITS)
    assert planned  # the same request without 0 in its range is fine

    found = problems_of(request(space=space, trials=20))

    assert list(found) == ["space.model.layers[0].out_features"]
    assert found["space.model.layers[0].out_features"].endswith(
        " with model.layers[0].out_features = 0: Input should be greater than or equal to 1")


def test_a_trial_problem_outside_its_params_is_at_the_base_path_naming_the_trial():
    # Searching the optimizer's type alone keeps Adam's betas, which SGD doesn't take.
    found = problems_of(request(method="grid", trials=None, space={"optimizer.type": {"choice": ["Adam", "SGD"]}}))

    assert found["base.optimizer.betas"] == 'trial 1 with optimizer.type = "SGD": unknown field'
    searched = {"optimizer": {"choice": [{"type": "Adam", "lr": 0.01}, {"type": "SGD", "lr": 0.1}]}}
    planned = parse_sweep(request(method="grid", trials=None, space=searched), LIMITS)
    assert trial_spec(planned.base, planned.trials[1])["optimizer"] == {"type": "SGD", "lr": 0.1}


def test_base_problems_are_under_base():
    base = digits_base(model={"layers": [{"type": "Linaer", "out_features": 16}]},
                       training={"epochs": 0})

    assert problems_of(request(base=base)) == {
        "base.model.layers[0].type": "'Linaer' is not a layer; did you mean 'Linear'?",
        "base.training.epochs": "Input should be greater than or equal to 1",
    }
    assert problems_of(request(base=[1])) == {"base": "Input should be a valid dictionary"}
    request_without_base = request()
    del request_without_base["base"]
    assert problems_of(request_without_base) == {"base": "missing"}
    local = digits_base(data={"source": "file", "path": "/etc/passwd.csv", "target": "y"})
    assert list(problems_of(request(base=local))) == ["base.data.source"]


def test_request_and_base_problems_come_together():
    found = problems_of(request(base=digits_base(task="clustering"), parallelism=0, method="bayes"))

    assert set(found) == {"base.task", "parallelism", "method"}


def test_the_metric_must_be_one_the_base_records():
    assert problems_of(request(metric="f1")) == {
        "metric": "'f1' is not a metric this job records; allowed: accuracy, epoch_seconds, loss, lr, "
                  "samples_per_second, val_accuracy, val_loss"}
    no_validation = digits_base(data={"source": "sklearn", "name": "load_digits", "validation_split": 0})
    assert problems_of(request(base=no_validation)) == {
        "metric": "'val_accuracy' is not a metric this job records; did you mean 'accuracy'?"}


@pytest.mark.parametrize("base, metric, expected", [
    (digits_base(), None, ("val_loss", "min")),  # a validation split, no early stopping
    (digits_base(data={"source": "sklearn", "name": "load_digits", "validation_split": 0}), None, ("loss", "min")),
    (digits_base(early_stopping={"monitor": "val_accuracy"}), None, ("val_accuracy", "max")),  # mode auto
    (digits_base(early_stopping={"monitor": "val_accuracy", "mode": "min"}), None, ("val_accuracy", "min")),
    (digits_base(early_stopping={"monitor": "val_accuracy", "mode": "min"}), "accuracy", ("accuracy", "max")),
    (digits_base(early_stopping={"monitor": "loss", "mode": "max"}), "val_loss", ("val_loss", "min")),
    (digits_base(), "val_accuracy", ("val_accuracy", "max")),
    (blobs_spec() | {"task": "regression", "model": {"layers": [{"type": "Linear", "out_features": 8},
                                                                {"type": "Linear", "out_features": 1}]}},
     "val_r2", ("val_r2", "max")),
])
def test_metric_and_mode_default_from_the_base(base, metric, expected):
    body = request(base=base, metric=metric, mode=None, scheduler=None)
    if metric is None:
        del body["metric"]
    del body["mode"]
    planned = parse_sweep(body, LIMITS)

    assert (planned.metric, planned.mode) == expected
    assert (planned.request["metric"], planned.request["mode"]) == expected


def test_a_given_mode_wins():
    planned = parse_sweep(request(metric="val_loss", mode="max"), LIMITS)

    assert planned.mode == "max"


def test_defaults_of_the_request():
    body = {"base": digits_base(), "space": {"optimizer.lr": {"uniform": [0.01, 0.1]}}, "method": "random",
            "trials": 2}
    planned = parse_sweep(body, LIMITS)

    assert {key: planned.request[key] for key in ("name", "parallelism", "seed", "scheduler")} == {
        "name": "sweep", "parallelism": 1, "seed": 0, "scheduler": None}


@pytest.mark.parametrize("min_epochs, max_epochs, eta, rungs", [
    (2, 18, 3, [2, 6, 18]),
    (1, 9, 3, [1, 3, 9]),
    (2, 20, 3, [2, 6, 18, 20]),
    (1, 8, 2, [1, 2, 4, 8]),
    (1, 10, 2, [1, 2, 4, 8, 10]),
    (3, 4, 10, [3, 4]),
    (1, 100, 10, [1, 10, 100]),
])
def test_asha_rungs_grow_by_the_reduction_factor_up_to_max_epochs(min_epochs, max_epochs, eta, rungs):
    assert asha_rungs(min_epochs, max_epochs, eta) == rungs
    scheduler = {"type": "asha", "min_epochs": min_epochs, "max_epochs": max_epochs, "reduction_factor": eta}
    planned = parse_sweep(request(scheduler=scheduler), LIMITS)
    assert planned.rungs == rungs and planned.base["training"]["epochs"] == max_epochs


def test_asha_defaults_min_epochs_one_max_epochs_the_bases_and_eta_three():
    planned = parse_sweep(request(scheduler={"type": "asha"}), LIMITS)

    assert planned.rungs == [1, 3, 9, 10]
    assert planned.request["scheduler"] == {"type": "asha", "min_epochs": 1, "max_epochs": 10,
                                            "reduction_factor": 3}


@pytest.mark.parametrize("scheduler, path, message", [
    ({"min_epochs": 0}, "scheduler.min_epochs", "Input should be greater than or equal to 1"),
    ({"min_epochs": 18}, "scheduler.max_epochs", "min_epochs (18) must be below max_epochs (18)"),
    ({"min_epochs": 19}, "scheduler.max_epochs", "min_epochs (19) must be below max_epochs (18)"),
    ({"max_epochs": 60}, "scheduler.max_epochs", "60 exceeds the limit of 50 (max_epochs)"),
    ({"reduction_factor": 1}, "scheduler.reduction_factor", "Input should be greater than or equal to 2"),
    ({"reduction_factor": 11}, "scheduler.reduction_factor", "Input should be less than or equal to 10"),
    ({"type": "hyperband"}, "scheduler.type", "Input should be 'asha'"),
    ({"grace": 1}, "scheduler.grace", "unknown field"),
])
def test_asha_bounds_are_refused(scheduler, path, message):
    body = request(scheduler={**ISSUE_EXAMPLE["scheduler"], **scheduler})

    assert problems_of(body, Limits(max_epochs=50)) == {path: message}


def test_asha_min_epochs_against_the_bases_epochs_when_max_is_left_out():
    assert problems_of(request(scheduler={"type": "asha", "min_epochs": 10})) == {
        "scheduler.min_epochs": "min_epochs (10) must be below max_epochs (10, the base's training.epochs)"}


@pytest.mark.parametrize("path", ["training.epochs", "training"])
def test_asha_keeps_epochs_out_of_the_space(path):
    value = 5 if path == "training.epochs" else {"epochs": 5}
    found = problems_of(request(space={path: {"choice": [value]}}))

    assert found == {f"space.{path}": "ASHA decides how long each trial trains (up to scheduler.max_epochs); "
                                      "training.epochs can't be searched with it"}
    assert parse_sweep(request(space={"training.epochs": {"choice": [3, 5]}}, scheduler=None), LIMITS)


@pytest.mark.parametrize("changes, path, message", [
    ({"trials": MAX_TRIALS + 1}, "trials", f"at most {MAX_TRIALS} trials (MAX_TRIALS), not {MAX_TRIALS + 1}"),
    ({"trials": 0}, "trials", "Input should be greater than or equal to 1"),
    ({"parallelism": MAX_PARALLELISM + 1}, "parallelism",
     f"at most {MAX_PARALLELISM} trials at once (MAX_PARALLELISM), not {MAX_PARALLELISM + 1}"),
    ({"parallelism": 0}, "parallelism", "Input should be greater than or equal to 1"),
    ({"space": {f"model.layers[{i % 3}].type": {"choice": ["ReLU"]} for i in range(3)} | {
        f"optimizer.{k}": {"choice": [0.1]} for k in ("lr", "eps", "weight_decay")} | {
        f"training.{k}": {"choice": [1]} for k in ("batch_size", "epochs", "max_runtime_seconds", "shuffle",
                                                   "gradient_clip_norm", "accumulate_batches", "precision")} | {
        f"checkpoint.{k}": {"choice": [1]} for k in ("every_n_epochs", "keep_last")} | {
        f"data.{k}": {"choice": [1]} for k in ("validation_split", "standardize", "image_shape")}},
     "space", f"at most {MAX_SPACE_PATHS} paths (MAX_SPACE_PATHS), not 18"),
    ({"space": {}}, "space", 'at least one path to search, e.g. {"optimizer.lr": {"log_uniform": [0.0001, 0.1]}}'),
    ({"space": {"model.layers[0].out_features": {"choice": list(range(1, MAX_CHOICES + 2))}}},
     "space.model.layers[0].out_features.choice", f"at most {MAX_CHOICES} values (MAX_CHOICES), not 101"),
    ({"space": {"model.layers[0].out_features": {"choice": []}}},
     "space.model.layers[0].out_features.choice", "List should have at least 1 item after validation, not 0"),
    ({"name": "x" * 201}, "name", "at most 200 characters, not 201"),
    ({"space": {"x" * 201: {"choice": [1]}}}, "space." + "x" * 201, "at most 200 characters, not 201"),
    ({"seed": -1}, "seed", "Input should be greater than or equal to 0"),
    ({"trials": 9.0}, "trials", "Input should be a valid integer"),
])
def test_every_size_bound_is_refused_naming_it(changes, path, message):
    assert problems_of(request(**changes)) == {path: message}


@pytest.mark.parametrize("domain, where, message", [
    ({"choise": [1]}, "choise", "'choise' is not a domain; did you mean 'choice'?"),
    ({"choice": [1], "uniform": [0, 1]}, "", "a domain is exactly one of: choice, uniform, log_uniform, int_uniform"),
    ({}, "", "a domain is exactly one of: choice, uniform, log_uniform, int_uniform"),
    ({"uniform": [0.1, 0.1]}, "uniform", "[lo, hi] with lo < hi, not [0.1, 0.1] (one value is a choice)"),
    ({"int_uniform": [5, 2]}, "int_uniform", "[lo, hi] with lo < hi, not [5, 2] (one value is a choice)"),
    ({"log_uniform": [0, 0.1]}, "log_uniform[0]", "log_uniform's lo must be above 0, not 0.0"),
    ({"log_uniform": [-1, 0.1]}, "log_uniform[0]", "log_uniform's lo must be above 0, not -1.0"),
    ({"uniform": [0.1, 1e39]}, "uniform[1]", "must be within float32's range (±3.403e+38), as the engine trains in "
                                             "float32, not 1e+39"),
    ({"uniform": [0.1, float("inf")]}, "uniform[1]", "Input should be a finite number"),
    ({"uniform": [0.1]}, "uniform", "List should have at least 2 items after validation, not 1"),
    ({"int_uniform": [1, 2.5]}, "int_uniform[1]", "Input should be a valid integer"),
    ({"choice": [16, 32, 16]}, "choice[2]", "16 is choice[0] already; each value is given once"),
    ([0.1, 0.2], "", "Input should be a valid dictionary or instance of Domain"),
])
def test_a_domain_is_refused_at_its_path(domain, where, message):
    path = "space.optimizer.lr" + (f".{where}" if where and not where.startswith("[") else where)

    assert problems_of(request(space={"optimizer.lr": domain})) == {path: message}


def test_a_path_within_another_searched_path_is_refused():
    space = {"optimizer": {"choice": [{"type": "SGD"}]}, "optimizer.lr": {"uniform": [0.01, 0.1]}}

    assert problems_of(request(space=space)) == {
        "space.optimizer.lr": "within optimizer, which the space searches too; search one or the other"}


def test_a_request_is_a_json_object():
    assert problems_of([ISSUE_EXAMPLE]) == {"": "a sweep request is a JSON object"}


def test_trial_spec_applies_params_to_a_copy():
    base = parse_service_spec(digits_base(), LIMITS).model_dump(mode="json")
    before = copy.deepcopy(base)
    layer = {"type": "Tanh"}
    spec = trial_spec(base, {"optimizer.lr": 0.05, "model.layers[1]": layer})

    assert base == before
    assert spec["optimizer"]["lr"] == 0.05 and spec["model"]["layers"][1] == {"type": "Tanh"}
    layer["type"] = "ReLU"
    assert spec["model"]["layers"][1] == {"type": "Tanh"}  # the value is copied, not shared


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "sweeps").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_example_sweep_is_valid(path):
    planned = parse_sweep(json.loads(path.read_text()), Limits())
    assert planned.trials and planned.metric


def test_a_scheduler_of_type_none_is_no_scheduler():
    planned = parse_sweep(request(scheduler={"type": "none"}), LIMITS)
    assert (planned.rungs, planned.request["scheduler"]) == ([], None)


def test_a_kilobytes_long_path_is_refused_and_echoed_cut_short():
    assert problems_of(request(space={"a" * 5000: {"choice": [1]}})) == {
        "space." + "a" * 214 + "…": "at most 200 characters, not 5000"}


def test_tpe_needs_trials_and_its_startup_trials_default_to_ten_at_most():
    assert problems_of(request(method="tpe", trials=None)) == {"trials": "required for method 'tpe'"}
    planned = parse_sweep(request(method="tpe", trials=30), LIMITS)
    assert (planned.request["trials"], planned.request["startup_trials"], len(planned.trials)) == (30, 10, 10)
    planned = parse_sweep(request(method="tpe", trials=4), LIMITS)
    assert (planned.request["trials"], planned.request["startup_trials"], len(planned.trials)) == (4, 4, 4)
    assert parse_sweep(request(), LIMITS).request["startup_trials"] is None  # random has none


@pytest.mark.parametrize("changes, message", [
    ({"method": "tpe", "trials": 4, "startup_trials": 5}, "at most trials (4), not 5"),
    ({"method": "tpe", "trials": 4, "startup_trials": 0}, "Input should be greater than or equal to 1"),
    ({"method": "random", "trials": 4, "startup_trials": 2}, "only for method 'tpe', not 'random'"),
])
def test_startup_trials_are_one_to_trials_and_only_for_tpe(changes, message):
    assert problems_of(request(**changes)) == {"startup_trials": message}


def test_tpes_startup_trials_are_the_random_trials_of_the_same_seed():
    random_trials = parse_sweep(request(method="random", trials=9, seed=3), LIMITS).trials
    planned = parse_sweep(request(method="tpe", trials=20, startup_trials=5, seed=3), LIMITS)

    assert planned.trials == random_trials[:5]
    assert (planned.request["method"], planned.request["trials"], planned.request["startup_trials"]) == ("tpe", 20, 5)


@pytest.mark.parametrize("domain, value", [
    ({"uniform": [-0.01, 0.1]}, "-0.01"),
    ({"choice": [0.01, -5.0]}, "-5.0"),
])
def test_a_tpe_domain_value_the_job_gate_refuses_is_refused_at_submit(domain, value):
    body = request(method="tpe", trials=10, startup_trials=1, seed=1, space={"optimizer.lr": domain})
    assert parse_sweep({**body, "method": "random", "trials": 1, "startup_trials": None}, LIMITS)  # its one trial
    assert problems_of(body) == {"space.optimizer.lr": f"optimizer.lr = {value}, a value method 'tpe' may "
                                                       "propose: Input should be greater than 0"}


def test_a_tpe_int_domain_end_the_job_gate_refuses_is_refused_at_submit():
    body = request(method="tpe", trials=10, startup_trials=1, space={"model.layers[0].out_features":
                                                                     {"int_uniform": [0, 64]}})
    assert problems_of(body) == {"space.model.layers[0].out_features": "model.layers[0].out_features = 0, a value "
                                 "method 'tpe' may propose: Input should be greater than or equal to 1"}
