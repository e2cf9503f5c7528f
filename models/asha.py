"""ASHA's promotion rule (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020,
Algorithm 2), as one pure function: given where every trial of a sweep stands, what to do next.

A trial trains to a rung's epoch, then waits. Whenever a slot frees up, ``next_action`` looks from the
second-highest rung down: a waiting trial among the best 1/η of the trials that reached its rung is promoted
to the next rung; with none to promote, a new trial starts (or nothing, once all were created). What is still
waiting when nothing can be promoted or created is what the sweep prunes. No database, no clock: the
controller (models.sweep_control) reads the states from the jobs and acts on the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrialState:
    """Where one trial stands."""

    number: int
    results: dict[int, float | None]  # rung index -> the metric at that rung's epoch (None: missing or NaN)
    waiting: bool  # paused at its last result's rung, waiting for a decision


@dataclass(frozen=True)
class Promote:
    """Resume trial ``number`` until the epoch of ``rungs[rung]``."""

    number: int
    rung: int


@dataclass(frozen=True)
class Create:
    """Start the next new trial (it trains to rung 0)."""


def next_action(rungs: list[int], eta: int, mode: str, trials: list[TrialState],
                can_create: bool) -> Promote | Create | None:
    """The paper's get_job: the best promotable trial of the highest rung that has one, else a new trial."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode is 'min' or 'max', not {mode!r}")
    if eta < 2:
        raise ValueError(f"the reduction factor is at least 2, not {eta}")
    for rung in range(len(rungs) - 2, -1, -1):
        reached = [trial for trial in trials if rung in trial.results]
        best = ranked(reached, rung, mode)[:len(reached) // eta]
        promotable = [trial for trial in best if trial.waiting and max(trial.results) == rung]
        if promotable:
            return Promote(promotable[0].number, rung + 1)
    return Create() if can_create else None


def ranked(trials: list[TrialState], rung: int, mode: str) -> list[TrialState]:
    """``trials`` best first by their result at ``rung``: a missing or NaN result last, ties by trial number."""
    sign = -1 if mode == "max" else 1

    def key(trial: TrialState) -> tuple:
        value = trial.results[rung]
        if value is None or math.isnan(value):
            return (1, 0.0, trial.number)
        return (0, sign * value, trial.number)

    return sorted(trials, key=key)
