"""The scikit-learn datasets a spec may name, with their allowed arguments and the shapes they give.

Shapes are known from the arguments alone, so the API checks a network against its data without
importing scikit-learn or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DataShape:
    """What a dataset gives: features per sample, targets, classes (None where not a classification set)."""

    n_samples: int
    n_features: int
    n_targets: int = 1
    n_classes: int | None = None


@dataclass(frozen=True)
class SklearnDataset:
    params: frozenset[str]
    shape: Callable[[dict], DataShape]


_RANDOM = {"random_state", "shuffle"}


def _regression(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), p.get("n_features", 100), n_targets=p.get("n_targets", 1))


def _classification(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), p.get("n_features", 20), n_classes=p.get("n_classes", 2))


def _two_d(p: dict) -> DataShape:
    return DataShape(p.get("n_samples", 100), 2, n_classes=2)


def _blobs(p: dict) -> DataShape:
    centers = p.get("centers")
    n_classes = centers if isinstance(centers, int) else 3
    return DataShape(p.get("n_samples", 100), p.get("n_features", 2), n_classes=n_classes)


def _bundled(n_samples: int, n_features: int, n_classes: int | None) -> Callable[[dict], DataShape]:
    return lambda p: DataShape(n_samples, n_features, n_classes=n_classes)


def _digits(p: dict) -> DataShape:
    n_class = p.get("n_class", 10)
    # load_digits keeps roughly 180 images a class.
    return DataShape(round(1797 * n_class / 10), 64, n_classes=n_class)


SKLEARN_DATASETS: dict[str, SklearnDataset] = {
    "make_regression": SklearnDataset(
        frozenset({"n_samples", "n_features", "n_informative", "n_targets", "bias", "effective_rank",
                   "tail_strength", "noise"} | _RANDOM), _regression),
    "make_classification": SklearnDataset(
        frozenset({"n_samples", "n_features", "n_informative", "n_redundant", "n_repeated", "n_classes",
                   "n_clusters_per_class", "flip_y", "class_sep", "hypercube", "shift", "scale"} | _RANDOM),
        _classification),
    "make_circles": SklearnDataset(frozenset({"n_samples", "noise", "factor"} | _RANDOM), _two_d),
    "make_moons": SklearnDataset(frozenset({"n_samples", "noise"} | _RANDOM), _two_d),
    "make_blobs": SklearnDataset(
        frozenset({"n_samples", "n_features", "centers", "cluster_std", "center_box"} | _RANDOM), _blobs),
    "load_digits": SklearnDataset(frozenset({"n_class"}), _digits),
    "load_iris": SklearnDataset(frozenset(), _bundled(150, 4, 3)),
    "load_wine": SklearnDataset(frozenset(), _bundled(178, 13, 3)),
    "load_breast_cancer": SklearnDataset(frozenset(), _bundled(569, 30, 2)),
    "load_diabetes": SklearnDataset(frozenset(), _bundled(442, 10, None)),
}
