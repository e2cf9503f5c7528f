"""TPE's proposals (models.tpe): deterministic for an rng, always within the domain, and drawn towards the values
of the good trials."""

from __future__ import annotations

import math
import random
import statistics

from models.sweep_spec import Domain
from models.tpe import propose, split

SPACE = {
    "optimizer.lr": Domain(log_uniform=[0.0001, 0.1]),
    "training.dropout": Domain(uniform=[0.0, 0.5]),
    "model.layers[0].out_features": Domain(int_uniform=[4, 7]),
    "training.batch_size": Domain(choice=[16, 32, {"big": 64}]),
}


def observations(count: int, seed: int = 1) -> list[tuple[dict, float]]:
    """Random trials whose loss is lowest for a small lr and batch size 32."""
    rng = random.Random(seed)
    observed = []
    for _ in range(count):
        params = {path: domain.sample(rng) for path, domain in SPACE.items()}
        loss = math.log10(params["optimizer.lr"]) + 4 + (0 if params["training.batch_size"] == 32 else 2)
        observed.append((params, loss))
    return observed


def test_the_same_rng_and_results_propose_the_same_trial():
    observed = observations(12)
    first = propose(SPACE, observed, "min", random.Random("0:12"))
    assert first == propose(SPACE, observed, "min", random.Random("0:12"))
    assert first != propose(SPACE, observed, "min", random.Random("0:13"))


def test_every_proposal_lies_in_its_domain_with_whole_numbers_for_int_uniform():
    rng = random.Random(5)
    for count in (0, 1, 2, 7, 30):
        for _ in range(20):
            params = propose(SPACE, observations(count, seed=count), "min", rng)
            assert 0.0001 <= params["optimizer.lr"] <= 0.1
            assert 0.0 <= params["training.dropout"] <= 0.5
            width = params["model.layers[0].out_features"]
            assert type(width) is int and 4 <= width <= 7
            assert params["training.batch_size"] in (16, 32, {"big": 64})
    # Both ends of an int domain are proposed (each whole number owns an interval of width 1).
    drawn = {propose({"w": Domain(int_uniform=[4, 7])}, [], "min", rng)["w"] for _ in range(200)}
    assert drawn == {4, 5, 6, 7}


def test_with_a_small_lr_clearly_better_proposals_concentrate_below_the_geometric_middle():
    observed = observations(20)
    rng = random.Random(0)
    proposed = [propose(SPACE, observed, "min", rng)["optimizer.lr"] for _ in range(50)]
    assert statistics.median(proposed) < math.sqrt(0.0001 * 0.1) / 3  # the middle in log space: 0.00316
    # The same results read with mode max (higher is better) pull the other way.
    upside = [propose(SPACE, observed, "max", rng)["optimizer.lr"] for _ in range(50)]
    assert statistics.median(upside) > math.sqrt(0.0001 * 0.1)


def test_the_good_trials_choice_value_is_proposed_most_often():
    observed = observations(20)
    rng = random.Random(0)
    counts = {16: 0, 32: 0, "big": 0}
    for _ in range(50):
        value = propose(SPACE, observed, "min", rng)["training.batch_size"]
        counts["big" if isinstance(value, dict) else value] += 1
    assert counts[32] == max(counts.values()) and counts[32] > 25, counts


def test_the_good_share_is_the_best_ceil_gamma_n_ties_to_the_earlier():
    observed = [({"x": n}, value) for n, value in enumerate([3.0, 1.0, 2.0, 1.0, 5.0])]
    good, rest = split(observed, "min", 0.25)  # ceil(1.25) = 2
    assert [p["x"] for p in good] == [1, 3] and [p["x"] for p in rest] == [2, 0, 4]
    good, _ = split(observed, "max", 0.25)
    assert [p["x"] for p in good] == [4, 0]
