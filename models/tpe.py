"""The Tree-structured Parzen Estimator (Bergstra et al., "Algorithms for Hyper-Parameter Optimization",
NeurIPS 2011), path by path as Optuna's default TPE: the next trial's value of each path is the candidate,
drawn from the density of the good trials' values, that is likeliest under it against the rest's.

The trials with a result are split by the sweep's metric into the best ``ceil(gamma * n)`` ("good") and the
rest; each side gets a Parzen estimator l(x) (good) and g(x) (rest): a uniform prior over the domain mixed
with a Gaussian at each value it saw (a choice: counts plus one per value). ``candidates`` draws from l are
scored by log l(x) - log g(x), and the best is proposed. Pure: no database; ``random.Random`` and ``math``
only, so the same inputs and rng state always propose the same trial.
"""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

from models.sweep_spec import Domain

SIGMA0 = 0.2  # Optuna's SIGMA0_MAGNITUDE: a bandwidth of 0.2 · range · n^(-1/5) (Scott's rule's form, d = 1)
MIN_SIGMA_SHARE = 0.01  # the narrowest Gaussian: 1% of the range (a few equal points mustn't make a spike)
MAX_REJECTIONS = 100  # draws of a Gaussian outside the domain redrawn before the value is clamped


def propose(space: dict[str, Domain], observed: list[tuple[dict, float]], mode: str, rng: random.Random,
            gamma: float = 0.25, candidates: int = 24) -> dict:
    """The next trial's params {path: value}: each path's best of ``candidates`` draws by l(x)/g(x), from the
    (params, value) results in ``observed`` (``mode`` "min" or "max": which values are better)."""
    good, rest = split(observed, mode, gamma)
    return {path: propose_value(domain, [params[path] for params in good if path in params],
                                [params[path] for params in rest if path in params], rng, candidates)
            for path, domain in space.items()}


def split(observed: list[tuple[dict, float]], mode: str, gamma: float) -> tuple[list[dict], list[dict]]:
    """The params of the best ``ceil(gamma * n)`` results (ties: the earlier one) and of the others."""
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(range(len(observed)), key=lambda index: (sign * observed[index][1], index))
    count = math.ceil(gamma * len(observed))
    return ([observed[index][0] for index in ranked[:count]], [observed[index][0] for index in ranked[count:]])


def propose_value(domain: Domain, good: list, rest: list, rng: random.Random, candidates: int) -> Any:
    """One path's value: the first of the best-scoring candidates drawn from the good values' estimator."""
    if domain.kind == "choice":
        return _propose_choice(domain.values, good, rest, rng, candidates)
    low, high = _internal_bounds(domain)
    good_points = [_internal(domain, value) for value in good]
    rest_points = [_internal(domain, value) for value in rest]
    best, best_score = None, -math.inf
    for _ in range(max(1, candidates)):
        point = _sample(low, high, good_points, rng)
        score = _log_density(point, low, high, good_points) - _log_density(point, low, high, rest_points)
        if best is None or score > best_score:
            best, best_score = point, score
    return _external(domain, best)


# --- numbers: uniform, log_uniform (in the logarithm), int_uniform (over lo - 0.5 .. hi + 0.5, rounded) ----------


def _internal_bounds(domain: Domain) -> tuple[float, float]:
    low, high = domain.values
    if domain.kind == "log_uniform":
        return math.log(low), math.log(high)
    if domain.kind == "int_uniform":
        return low - 0.5, high + 0.5  # each whole number owns an interval of width 1
    return float(low), float(high)


def _internal(domain: Domain, value: Any) -> float:
    return math.log(value) if domain.kind == "log_uniform" else float(value)


def _external(domain: Domain, point: float) -> Any:
    """The domain's value at an internal point, always within [lo, hi]."""
    low, high = domain.values
    if domain.kind == "int_uniform":
        return min(high, max(low, round(point)))
    value = math.exp(point) if domain.kind == "log_uniform" else point
    return min(high, max(low, value))


def _sigma(low: float, high: float, count: int) -> float:
    width = high - low
    return min(width, max(width * MIN_SIGMA_SHARE, SIGMA0 * width * max(1, count) ** -0.2))


def _sample(low: float, high: float, points: list[float], rng: random.Random) -> float:
    """A draw from the estimator: the prior (weight 1) or one point's Gaussian (weight 1 each), truncated."""
    component = rng.randrange(len(points) + 1)
    if component == len(points):
        return low + (high - low) * rng.random()
    mu, sigma = points[component], _sigma(low, high, len(points))
    for _ in range(MAX_REJECTIONS):
        value = rng.gauss(mu, sigma)
        if low <= value <= high:
            return value
    return min(high, max(low, mu))


def _log_density(x: float, low: float, high: float, points: list[float]) -> float:
    """log of the estimator's density at ``x``: the mixture of the uniform prior and the truncated Gaussians."""
    total = 1.0 / (high - low)  # the prior never vanishes, so neither does the mixture
    if points:
        sigma = _sigma(low, high, len(points))
        for mu in points:
            mass = _phi((high - mu) / sigma) - _phi((low - mu) / sigma)
            total += math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi) * mass)
    return math.log(total / (len(points) + 1))


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2)))


# --- choices -----------------------------------------------------------------------------------------------


def _propose_choice(values: list, good: list, rest: list, rng: random.Random, candidates: int) -> Any:
    """A choice's value: weights = 1 + how often each value came up (values compared as JSON text)."""
    keys = [json.dumps(value, sort_keys=True) for value in values]
    good_weights = _weights(keys, good)
    rest_weights = _weights(keys, rest)
    good_total, rest_total = sum(good_weights), sum(rest_weights)
    best, best_score = 0, -math.inf
    for _ in range(max(1, candidates)):
        index = rng.choices(range(len(values)), weights=good_weights)[0]
        score = math.log(good_weights[index] / good_total) - math.log(rest_weights[index] / rest_total)
        if score > best_score:
            best, best_score = index, score
    return copy.deepcopy(values[best])


def _weights(keys: list[str], seen: list) -> list[float]:
    counts = {key: 1.0 for key in keys}
    for value in seen:
        key = json.dumps(value, sort_keys=True)
        if key in counts:
            counts[key] += 1.0
    return [counts[key] for key in keys]
