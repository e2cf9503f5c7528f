"""The scikit-learn datasets a spec may name, with their allowed arguments and the shapes they give.

Shapes are known from the arguments alone, so the API checks a network against its data without
importing torch. Whether the arguments fit together is scikit-learn's to say: ``argument_problems`` asks
it (its parameter constraints, then the function itself on a couple of samples), importing it lazily.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DataShape:
    """What a dataset gives: features per sample, targets, classes (None where not a classification set)."""

    n_samples: int
    n_features: int
    n_targets: int = 1
    n_classes: int | None = None


def _no_setup(p: dict) -> int:
    return 0


@dataclass(frozen=True)
class SklearnDataset:
    params: frozenset[str]
    shape: Callable[[dict], DataShape]
    # About how many values the function draws before its first sample (centres, covariances, coefficients).
    setup: Callable[[dict], int] = _no_setup


_RANDOM = {"random_state", "shuffle"}
# One turn of a generator's Python loop (one a cluster or centre) costs about as much time as drawing this
# many values: ~30 µs against ~25 ns, measured with make_blobs and make_classification.
TURN_COST = 1000
# Samples the probe asks a generator for: enough to run every check it makes, too few to cost anything.
PROBE_SAMPLES = 2
# Characters of scikit-learn's message kept in a problem.
MAX_MESSAGE = 300


def _regression(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), p.get("n_features", 100), n_targets=p.get("n_targets", 1))


def _regression_setup(p: dict) -> int:
    return p.get("n_features", 100) * (p.get("n_targets", 1) + 1)  # the coefficients and a feature permutation


def _classification(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), p.get("n_features", 20), n_classes=p.get("n_classes", 2))


def _classification_setup(p: dict) -> int:
    clusters = p.get("n_classes", 2) * p.get("n_clusters_per_class", 2)
    informative = p.get("n_informative", 2)
    return clusters * (informative * informative + informative + TURN_COST)  # a covariance per cluster


def _two_d(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), 2, n_classes=2)


def _blobs(p: dict) -> DataShape:
    centers = p.get("centers")
    n_classes = centers if isinstance(centers, int) else 3
    return DataShape(p.get("n_samples", 100), p.get("n_features", 2), n_classes=n_classes)


def _blobs_setup(p: dict) -> int:
    centers = p.get("centers")
    n_centers = len(centers) if isinstance(centers, list) else centers if isinstance(centers, int) else 3
    return n_centers * (p.get("n_features", 2) + TURN_COST)


def _bundled(n_samples: int, n_features: int, n_classes: int | None) -> Callable[[dict], DataShape]:
    return lambda p: DataShape(n_samples, n_features, n_classes=n_classes)


# Images of each digit in load_digits, 0 to 9: load_digits(n_class=k) gives the first k classes.
_DIGITS_PER_CLASS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)


def _digits(p: dict) -> DataShape:
    n_class = p.get("n_class", 10)
    return DataShape(sum(_DIGITS_PER_CLASS[:n_class]), 64, n_classes=n_class)


SKLEARN_DATASETS: dict[str, SklearnDataset] = {
    "make_regression": SklearnDataset(
        frozenset({"n_samples", "n_features", "n_informative", "n_targets", "bias", "effective_rank",
                   "tail_strength", "noise"} | _RANDOM), _regression, _regression_setup),
    "make_classification": SklearnDataset(
        frozenset({"n_samples", "n_features", "n_informative", "n_redundant", "n_repeated", "n_classes",
                   "n_clusters_per_class", "flip_y", "class_sep", "hypercube", "shift", "scale"} | _RANDOM),
        _classification, _classification_setup),
    "make_circles": SklearnDataset(frozenset({"n_samples", "noise", "factor"} | _RANDOM), _two_d),
    "make_moons": SklearnDataset(frozenset({"n_samples", "noise"} | _RANDOM), _two_d),
    "make_blobs": SklearnDataset(
        frozenset({"n_samples", "n_features", "centers", "cluster_std", "center_box"} | _RANDOM), _blobs,
        _blobs_setup),
    "load_digits": SklearnDataset(frozenset({"n_class"}), _digits),
    "load_iris": SklearnDataset(frozenset(), _bundled(150, 4, 3)),
    "load_wine": SklearnDataset(frozenset(), _bundled(178, 13, 3)),
    "load_breast_cancer": SklearnDataset(frozenset(), _bundled(569, 30, 2)),
    "load_diabetes": SklearnDataset(frozenset(), _bundled(442, 10, None)),
}


# --- scikit-learn's own rules for the arguments -----------------------------------------------------

ArgumentProblem = tuple[str | None, str]  # (the argument at fault, or None for several; the message)


def argument_problems(name: str, params: dict, max_setup: int) -> list[ArgumentProblem]:
    """What scikit-learn refuses in ``name(**params)``, called exactly as the engine calls it.

    First each argument against the function's declared constraints (types, ranges, random_state below
    2^32); then the function itself, on PROBE_SAMPLES samples, for the rules across arguments that only
    its body knows (n_informative + n_redundant <= n_features, centers as an array of points, ...). The call
    draws about ``setup(params)`` values whatever the sample count, so a spec over ``max_setup`` is refused
    before it: the API process never does a worker's work.

    The answer is the arguments' (scikit-learn refuses arguments, not what it draws, and a bundled set reads
    the same file), so arguments that are all scalars are asked about once a process: the same spec submitted
    again, and the worker's check of it at claim, find the answer.
    """
    if any(isinstance(value, (list, dict)) for value in params.values()):
        return _argument_problems(name, params, max_setup)
    # By value and type: 1 and True are different answers.
    arguments = tuple(sorted((key, type(value).__name__, value) for key, value in params.items()))
    return list(_argument_problems_once(name, arguments, max_setup))


@functools.lru_cache(maxsize=256)
def _argument_problems_once(name: str, arguments: tuple, max_setup: int) -> tuple[ArgumentProblem, ...]:
    return tuple(_argument_problems(name, {key: value for key, _kind, value in arguments}, max_setup))


def warm_up() -> None:
    """Import what ``argument_problems`` needs now: scikit-learn takes over a second to import (scipy's
    docstrings), which the first spec naming one of its datasets would otherwise wait for."""
    import sklearn.datasets  # noqa: F401
    import sklearn.utils._param_validation  # noqa: F401


def _argument_problems(name: str, params: dict, max_setup: int) -> list[ArgumentProblem]:
    import sklearn.datasets  # lazily: a process that never checks one (the CLI, a test) doesn't pay for it

    function = getattr(sklearn.datasets, name)
    problems = _constraint_problems(function, params)
    if problems:
        return problems
    entry = SKLEARN_DATASETS[name]
    cost = entry.setup(params) + PROBE_SAMPLES * entry.shape(params).n_features
    if cost > max_setup:
        return [(None, f"{name} with these arguments draws about {cost:,} values before its first sample, "
                       f"over the limit of {max_setup:,} (max_generator_setup)")]
    return _probe(function, name, params)


def _constraint_problems(function, params: dict) -> list[ArgumentProblem]:
    """Each argument against the constraints scikit-learn's ``validate_params`` declares for the function."""
    from sklearn.utils._param_validation import InvalidParameterError, validate_parameter_constraints

    constraints = getattr(function, "_skl_parameter_constraints", {})
    problems = []
    for key, value in params.items():
        if key not in constraints:
            continue
        try:
            validate_parameter_constraints({key: constraints[key]}, {key: value}, caller_name=function.__name__)
        except InvalidParameterError as exc:
            message = _short(_without_preamble(str(exc)))
            if "instance of 'tuple'" in message:  # center_box: the engine passes a JSON list on as a list
                message += " (a spec's JSON has no tuples: leave it out for the default)"
            problems.append((key, message))
    return problems


def _probe(function, name: str, params: dict) -> list[ArgumentProblem]:
    """Call the function on PROBE_SAMPLES samples; what it raises is the problem with these arguments."""
    arguments = dict(params)
    if name.startswith("make_"):
        n_samples = params.get("n_samples", PROBE_SAMPLES)
        arguments["n_samples"] = min(n_samples, PROBE_SAMPLES) if isinstance(n_samples, int) else n_samples
    try:
        function(**arguments)
    except Exception as exc:  # whatever scikit-learn raises, the arguments are what it refused
        message = _short(str(exc)) or type(exc).__name__
        return [(_named(message, params), f"{name} refuses these arguments: {message}")]
    return []


def _short(message: str) -> str:
    """scikit-learn's message on one line, cut at MAX_MESSAGE characters: it may quote a long argument back."""
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " …"


def _without_preamble(message: str) -> str:
    """``The 'noise' parameter of make_circles must be ...`` -> ``must be ...`` (the path names the field)."""
    return re.sub(r"^The '\w+' parameter of \w+ ", "", message)


def _named(message: str, params: dict) -> str | None:
    """The argument a message names first, of those the spec gives; else, for a message about an array's
    shape, the one list given; else None."""
    found = [(match.start(), key) for key in params
             if (match := re.search(rf"\b{re.escape(key)}\b", message))]
    if found:
        return min(found)[1]
    lists = [key for key, value in params.items() if isinstance(value, list)]
    about_arrays = re.search(r"\barray|\bbroadcast|\bshape", message)
    return lists[0] if about_arrays and len(lists) == 1 else None
