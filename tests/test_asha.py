"""ASHA's promotion rule (models.asha) against the paper's Algorithm 2, with scripted metric curves: the exact
decisions, event by event, and the trials left waiting (the pruned) at the end, computed by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.asha import Create, Promote, TrialState, next_action
from models.sweep_spec import asha_rungs

NAN = float("nan")


def state(number: int, *results: float | None, waiting: bool = True) -> TrialState:
    return TrialState(number, dict(enumerate(results)), waiting)


def simulate(curves: list[list[float | None]], rungs: list[int], eta: int, mode: str, parallelism: int,
             on_promote=None) -> tuple[list[str], set[int], set[int]]:
    """Run a sweep of len(curves) trials on ``parallelism`` slots: fill free slots by asking next_action until it
    answers None or no slot is free; then the job that started first ends with its trial's scripted metric at
    its rung. Returns the log of decisions and results, the trials left waiting, and those that reached the top."""
    results: dict[int, dict[int, float | None]] = {}
    waiting: set[int] = set()
    running: list[tuple[int, int]] = []  # (trial, rung it trains to), oldest first
    log: list[str] = []

    def states() -> list[TrialState]:
        return [TrialState(n, dict(results[n]), n in waiting) for n in sorted(results)]

    while True:
        while len(running) < parallelism:
            action = next_action(rungs, eta, mode, states(), can_create=len(results) < len(curves))
            if action is None:
                log.append("none")
                break
            if isinstance(action, Create):
                number = len(results)
                results[number] = {}
                running.append((number, 0))
                log.append(f"create {number}")
            else:
                if on_promote:
                    on_promote(action, states())
                waiting.remove(action.number)
                running.append((action.number, action.rung))
                log.append(f"promote {action.number} to {action.rung}")
        if not running:
            break
        number, rung = running.pop(0)
        results[number][rung] = curves[number][rung]
        if rung < len(rungs) - 1:
            waiting.add(number)
        log.append(f"{number} at {rung}: {curves[number][rung]}")
    top = {n for n in results if len(rungs) - 1 in results[n]}
    return log, waiting, top


# Accuracy at rungs [1, 3, 9] epochs (η = 3, mode max) of nine trials. Only what a trial reaches is read.
ACCURACY = [
    [0.50, 0.55, 0.60],
    [0.70, 0.72, 0.74],
    [0.60, 0.62, 0.64],
    [0.90, 0.91, 0.95],
    [0.40, 0.45, 0.50],
    [0.80, 0.86, 0.96],
    [0.30, 0.35, 0.40],
    [0.75, 0.78, 0.80],
    [0.65, 0.66, 0.70],
]


def test_nine_trials_three_at_a_time_follow_the_papers_rule():
    log, waiting, top = simulate(ACCURACY, [1, 3, 9], eta=3, mode="max", parallelism=3)

    # By hand: a rung of n results promotes its best floor(n/3) that wait there; the highest rung first.
    assert log == [
        "create 0", "create 1", "create 2",
        "0 at 0: 0.5", "create 3",           # rung 0: 1 result, floor(1/3) = 0 promotable
        "1 at 0: 0.7", "create 4",
        "2 at 0: 0.6", "promote 1 to 1",     # rung 0: 3 results, the best 1 (trial 1, 0.7) goes on
        "3 at 0: 0.9", "promote 3 to 1",     # rung 0: 4 results, the best 1 is now trial 3
        "4 at 0: 0.4", "create 5",           # the best of rung 0 (3) is already on its way
        "1 at 1: 0.72", "create 6",          # rung 1: 1 result, nothing to promote
        "3 at 1: 0.91", "create 7",          # rung 1: 2 results, floor(2/3) = 0
        "5 at 0: 0.8", "promote 5 to 1",     # rung 0: 6 results, the best 2 are trials 3 and 5
        "6 at 0: 0.3", "create 8",
        "7 at 0: 0.75", "none",              # all 9 created; rung 0's best 2 (3, 5) already promoted
        "5 at 1: 0.86", "promote 3 to 2", "none",  # rung 1: 3 results, the best 1 (trial 3, 0.91) to the top
        "8 at 0: 0.65", "promote 7 to 1", "none",  # rung 0: 9 results, the best 3 are 3, 5 and 7
        "3 at 2: 0.95", "none",
        "7 at 1: 0.78", "none",              # rung 1: 4 results, the best 1 is trial 3 still
    ]
    assert top == {3}
    assert waiting == {0, 1, 2, 4, 5, 6, 7, 8}  # what the sweep prunes


def test_one_trial_at_a_time_promotes_as_soon_as_a_rung_allows():
    log, waiting, top = simulate(ACCURACY, [1, 3, 9], eta=3, mode="max", parallelism=1)

    decisions = [entry for entry in log if not entry[0].isdigit()]
    assert decisions == [
        "create 0", "create 1", "create 2",
        "promote 1 to 1",                    # rung 0: 0.5, 0.7, 0.6
        "create 3", "promote 3 to 1",        # rung 0: four results, trial 3 (0.9) is the best 1
        "create 4", "create 5", "promote 5 to 1",  # rung 0: six results, the best 2 are 3 and 5
        "promote 3 to 2",                    # rung 1: 0.72, 0.91, 0.86: the best 1 is 3
        "create 6", "create 7", "create 8", "promote 7 to 1",  # rung 0: nine results, the best 3: 3, 5, 7
        "none",
    ]
    assert top == {3}
    assert waiting == {0, 1, 2, 4, 5, 6, 7, 8}


# Loss at rungs [1, 2, 4] (η = 2, mode min): trial 2 diverged (NaN), trials 1 and 3 tie at rung 0.
LOSS = [
    [0.9, 0.8, 0.7],
    [0.5, 0.45, 0.4],
    [NAN, NAN, NAN],
    [0.5, 0.3, 0.2],
    [0.6, 0.5, 0.45],
]


def test_five_trials_two_at_a_time_with_a_nan_and_a_tie_minimizing_loss():
    log, waiting, top = simulate(LOSS, [1, 2, 4], eta=2, mode="min", parallelism=2)

    assert log == [
        "create 0", "create 1",
        "0 at 0: 0.9", "create 2",           # rung 0: floor(1/2) = 0
        "1 at 0: 0.5", "promote 1 to 1",     # rung 0: 0.9, 0.5: the lower goes on
        "2 at 0: nan", "create 3",           # rung 0: the best 1 of three is trial 1, already promoted
        "1 at 1: 0.45", "create 4",          # rung 1: floor(1/2) = 0
        "3 at 0: 0.5", "promote 3 to 1",     # rung 0's best 2: 1 and 3 (tied at 0.5; NaN ranks last)
        "4 at 0: 0.6", "none",
        "3 at 1: 0.3", "promote 3 to 2", "none",  # rung 1: 0.45, 0.3: trial 3 to the top
        "3 at 2: 0.2", "none",
    ]
    assert top == {3}
    assert waiting == {0, 1, 2, 4}


def test_the_best_of_a_rung_depends_on_the_mode():
    trials = [state(0, 0.2), state(1, 0.8), state(2, 0.5), state(3, 0.1)]

    assert next_action([1, 2], 2, "min", trials, True) == Promote(3, 1)
    assert next_action([1, 2], 2, "max", trials, True) == Promote(1, 1)


def test_ties_go_to_the_lower_trial_number():
    assert next_action([1, 2], 2, "min", [state(1, 0.5), state(0, 0.5)], True) == Promote(0, 1)
    # Only one of the two may go; it is trial 0, which is not waiting: nothing is promoted.
    busy = [state(0, 0.5, waiting=False), state(1, 0.5)]
    assert next_action([1, 2], 2, "min", busy, True) == Create()
    assert next_action([1, 2], 2, "min", busy, False) is None


@pytest.mark.parametrize("mode, missing", [("min", None), ("max", None), ("min", NAN), ("max", NAN)])
def test_a_missing_or_nan_result_ranks_last_in_either_mode(mode, missing):
    worse = 1e9 if mode == "min" else -1e9
    trials = [state(0, missing), state(1, worse)]

    assert next_action([1, 2], 2, mode, trials, True) == Promote(1, 1)
    assert next_action([1, 2], 2, mode, [state(0, missing), state(1, missing)], True) == Promote(0, 1)


def test_the_highest_rung_with_a_promotable_trial_goes_first():
    trials = [state(0, 0.1, 0.1), state(1, 0.2, 0.3), state(2, 0.05), state(3, 0.4), state(4, 0.5, waiting=False)]

    # Rung 1 (0.1, 0.3) promotes trial 0 to rung 2 before rung 0 (five results) promotes trial 2, its best.
    assert next_action([1, 2, 4], 2, "min", trials, True) == Promote(0, 2)
    done = [state(0, 0.1, 0.1, waiting=False)] + trials[1:]
    # Rung 1's best is on its way; rung 0's best 2 are trial 2 (waiting there) and trial 0 (past it).
    assert next_action([1, 2, 4], 2, "min", done, True) == Promote(2, 1)


def test_a_trial_at_the_top_rung_is_never_promoted_and_no_trial_twice_from_a_rung():
    finished = [state(0, 0.1, 0.1, 0.1, waiting=False), state(1, 0.2, 0.2), state(2, 0.9), state(3, 0.9)]

    # Rung 2 is the top: not a rung to promote from. Rung 1 (0.1, 0.2): its best 1 is trial 0, finished.
    # Rung 0 (0.1, 0.2, 0.9, 0.9): its best 2 are 0 and 1, both past it.
    assert next_action([1, 2, 4], 2, "min", finished, False) is None


def test_nothing_to_promote_and_nothing_to_create_is_none():
    assert next_action([2, 6, 18], 3, "max", [], False) is None
    assert next_action([2, 6, 18], 3, "max", [], True) == Create()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        next_action([1, 2], 2, "auto", [], True)
    with pytest.raises(ValueError, match="reduction factor"):
        next_action([1, 2], 1, "min", [], True)


# --- properties ---------------------------------------------------------------------------------

METRICS = st.one_of(st.sampled_from([0.1, 0.2, 0.3, 0.5]), st.none(), st.just(NAN))


def beats(a: TrialState, b: TrialState, rung: int, mode: str) -> bool:
    """Whether ``a`` ranks above ``b`` at ``rung``, spelled out apart from models.asha's sort key."""
    x, y = a.results[rung], b.results[rung]
    x_missing, y_missing = x is None or math.isnan(x), y is None or math.isnan(y)
    if x_missing != y_missing:
        return y_missing
    if not x_missing and x != y:
        return x < y if mode == "min" else x > y
    return a.number < b.number


@settings(max_examples=150, deadline=None)
@given(eta=st.sampled_from([2, 3, 4]), min_epochs=st.integers(1, 3), growth=st.integers(1, 30),
       mode=st.sampled_from(["min", "max"]), parallelism=st.integers(1, 5), data=st.data())
def test_every_promotion_is_within_the_top_of_its_rung_and_happens_once(eta, min_epochs, growth, mode,
                                                                         parallelism, data):
    rungs = asha_rungs(min_epochs, min_epochs + growth, eta)
    curves = data.draw(st.lists(st.lists(METRICS, min_size=len(rungs), max_size=len(rungs)), min_size=1,
                                max_size=20))
    promoted: set[tuple[int, int]] = set()

    def check(action: Promote, trials: list[TrialState]) -> None:
        rung = action.rung - 1
        trial = next(t for t in trials if t.number == action.number)
        assert trial.waiting and max(trial.results) == rung
        reached = [t for t in trials if rung in t.results]
        above = sum(beats(other, trial, rung, mode) for other in reached if other is not trial)
        assert above < len(reached) // eta, "promoted from outside the top 1/η of its rung"
        assert (action.number, rung) not in promoted, "promoted twice from one rung"
        promoted.add((action.number, rung))

    log, waiting, top = simulate(curves, rungs, eta, mode, parallelism, on_promote=check)

    assert sum(entry.startswith("create") for entry in log) == len(curves)
    assert waiting | top == set(range(len(curves))) and not waiting & top
    # At the end every rung's top 1/η has gone on: nothing waiting is among them.
    final = [TrialState(n, {k: curves[n][k] for k in range(len(rungs)) if (n, k - 1) in promoted or k == 0},
                        n in waiting) for n in range(len(curves))]
    for rung in range(len(rungs) - 1):
        reached = [t for t in final if rung in t.results]
        for trial in reached:
            above = sum(beats(other, trial, rung, mode) for other in reached if other is not trial)
            if above < len(reached) // eta:
                assert (trial.number, rung) in promoted
