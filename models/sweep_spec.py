"""A sweep request: a base job spec, a search space over its paths, and how to search it, validated into the
trials it will run (``parse_sweep``) or a SpecError listing every problem by field path.

Every trial is an ordinary job: its spec is the base with the trial's parameters applied (``trial_spec``) and is
checked by models.validation, the same gate as a job's submit, before the sweep is accepted. Sampling is
deterministic: the same request (seed included) always plans the same trials. Pure: no database, no Flask, no
torch; the API plans a sweep and the controller (models.sweep_control) runs it.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from models.spec import (
    MAX_WHOLE,
    Float,
    JobSpec,
    Limits,
    PositiveInt,
    Problem,
    SpecError,
    SpecProblem,
    Strict,
    Text,
    higher_is_better,
    problems_from_errors,
    unknown_name_message,
)
from models.text import ECHO_LENGTH, quoted, text_problem
from models.validation import parse_service_spec

# Bounds of one sweep (one owner: every check and message reads them here).
MAX_TRIALS = 200  # trials of one sweep: each is a job, listed in full by GET /sweeps/{id}/trials
MAX_PARALLELISM = 32  # trials in flight at once
MAX_SPACE_PATHS = 16  # paths one space may search
MAX_CHOICES = 100  # values of one choice domain
MAX_SHOWN_PATH = 220  # characters of a problem's path echoed back ("space." and a path of stored text's 200)
DEFAULT_REDUCTION_FACTOR = 3  # ASHA's η: the paper's default
DEFAULT_STARTUP_TRIALS = 10  # tpe's random trials before its first proposal, unless fewer trials in all
EPOCHS_PATH = "training.epochs"  # ASHA's to decide, never the space's
DOMAIN_KINDS = ("choice", "uniform", "log_uniform", "int_uniform")

Bounds = Annotated[list[Float], Field(min_length=2, max_length=2)]
WholeBounds = Annotated[list[Annotated[int, Field(ge=-MAX_WHOLE, le=MAX_WHOLE)]], Field(min_length=2, max_length=2)]


class Domain(Strict):
    """Where one path's values come from: exactly one of ``choice`` (listed values, in order), ``uniform`` and
    ``log_uniform`` (floats between lo and hi) and ``int_uniform`` (whole numbers from lo to hi, both included)."""

    choice: Annotated[list[Any], Field(min_length=1, json_schema_extra={"maxItems": MAX_CHOICES})] | None = None
    uniform: Bounds | None = None
    log_uniform: Bounds | None = None
    int_uniform: WholeBounds | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_known_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic says what it wanted
        for key in data:
            if key not in DOMAIN_KINDS:
                raise SpecProblem(str(key), unknown_name_message(key, "domain", DOMAIN_KINDS))
        if len(data) != 1:
            raise ValueError(f"a domain is exactly one of: {', '.join(DOMAIN_KINDS)}")
        return data

    @field_validator("choice")
    @classmethod
    def _distinct_choices(cls, values: list[Any]) -> list[Any]:
        if len(values) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} values (MAX_CHOICES), not {len(values)}")
        first: dict[str, int] = {}
        for index, value in enumerate(values):
            key = json.dumps(value, sort_keys=True)
            if key in first:
                raise SpecProblem(f"[{index}]", f"{quoted(value)} is choice[{first[key]}] already; "
                                                "each value is given once")
            first[key] = index
        return values

    @model_validator(mode="after")
    def _ordered_bounds(self) -> Domain:
        if self.kind != "choice":
            low, high = self.values
            if not low < high:
                raise SpecProblem(self.kind, f"[lo, hi] with lo < hi, not [{low}, {high}] (one value is a choice)")
            if self.kind == "log_uniform" and low <= 0:
                raise SpecProblem(f"{self.kind}[0]", f"log_uniform's lo must be above 0, not {low}")
        return self

    @property
    def kind(self) -> str:
        """Which of DOMAIN_KINDS this is."""
        return next(kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None)

    @property
    def values(self) -> list:
        """The choice's values or the [lo, hi] bounds."""
        return getattr(self, self.kind)

    def sample(self, rng: random.Random) -> Any:
        """One value drawn with ``rng`` (a choice's value is copied: trials never share one)."""
        if self.kind == "choice":
            return copy.deepcopy(self.values[rng.randrange(len(self.values))])
        low, high = self.values
        if self.kind == "int_uniform":
            return rng.randint(low, high)
        if self.kind == "uniform":
            return min(high, low + (high - low) * rng.random())
        # Uniform in the logarithm; exp's rounding may step a hair outside [lo, hi], so clamp.
        value = math.exp(math.log(low) + (math.log(high) - math.log(low)) * rng.random())
        return min(high, max(low, value))

    def as_json(self) -> dict:
        """The domain as the request holds it: ``{"kind": values}``."""
        return {self.kind: copy.deepcopy(self.values)}


class Asha(Strict):
    """ASHA: trials pause at each rung (min_epochs · η^k, then max_epochs) and the best 1/η go on."""

    type: Literal["asha"]
    min_epochs: PositiveInt = 1  # the first rung (the grace period): no trial stops before it
    max_epochs: PositiveInt | None = None  # the last rung; default: the base's training.epochs
    reduction_factor: Annotated[int, Field(ge=2, le=10)] = DEFAULT_REDUCTION_FACTOR


def _bounded(limit: int, name: str, what: str):
    """An int of 1..limit, refused above it with the bound named."""

    def check(value: int) -> int:
        if value > limit:
            raise ValueError(f"at most {limit} {what} ({name}), not {value}")
        return value

    return Annotated[int, Field(ge=1, json_schema_extra={"maximum": limit}), AfterValidator(check)]


class SweepRequest(Strict):
    """The body of POST /sweeps, field by field; ``parse_sweep`` checks it against its base."""

    name: Text(min_length=1) = "sweep"
    base: dict[str, Any]  # a job spec: models.validation checks it
    space: dict[str, Domain]  # path -> domain; paths are checked against the base (path_problem)
    method: Literal["grid", "random", "tpe"]
    trials: _bounded(MAX_TRIALS, "MAX_TRIALS", "trials") | None = None  # random, tpe: required; grid: its size
    # tpe: the first trials, drawn as random ones are; the later ones are proposed from their results
    startup_trials: _bounded(MAX_TRIALS, "MAX_TRIALS", "startup trials") | None = None
    parallelism: _bounded(MAX_PARALLELISM, "MAX_PARALLELISM", "trials at once") = 1
    metric: Text(min_length=1) | None = None
    mode: Literal["min", "max"] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    scheduler: Asha | None = None

    @field_validator("scheduler", mode="before")
    @classmethod
    def _none_is_no_scheduler(cls, value: Any) -> Any:
        # "none, or ASHA": {"type": "none"} says what leaving the scheduler out (or null) says.
        return None if value == {"type": "none"} else value

    @field_validator("space")
    @classmethod
    def _some_paths(cls, space: dict) -> dict:
        if not space:
            raise ValueError("at least one path to search, e.g. {\"optimizer.lr\": {\"log_uniform\": [0.0001, 0.1]}}")
        if len(space) > MAX_SPACE_PATHS:
            raise ValueError(f"at most {MAX_SPACE_PATHS} paths (MAX_SPACE_PATHS), not {len(space)}")
        return space


@dataclass(frozen=True)
class PlannedSweep:
    """A sweep that can run: every trial's spec passed the job gate."""

    request: dict  # the normalized request (defaults filled in: metric, mode, seed, trials for grid), JSON-able
    base: dict  # the normalized base spec, with training.epochs = max_epochs under ASHA
    trials: list[dict]  # each trial's params {path: value}, in trial order (sampled deterministically from seed);
    # tpe: its startup trials only, the controller proposes (and appends) the rest
    rungs: list[int]  # ASHA's pause epochs, the last = max_epochs; [] without a scheduler
    metric: str
    mode: str  # "min" | "max"


def parse_sweep(body: Any, limits: Limits) -> PlannedSweep:
    """Validate a sweep request (a parsed JSON value) and plan its trials; raise SpecError listing every problem
    by field path (``space.<path>``, ``base.<path>``, ``trials``, ...)."""
    if not isinstance(body, dict):
        raise SpecError([Problem("", "a sweep request is a JSON object")])
    problems, request = [], None
    try:
        request = SweepRequest.model_validate(body)
    except ValidationError as exc:
        problems += problems_from_errors(exc.errors())
    spec = None
    if isinstance(body.get("base"), dict):
        try:
            spec = parse_service_spec(body["base"], limits)
        except SpecError as exc:
            problems += [Problem(_under("base", problem.path), problem.message) for problem in exc.problems]
    if problems:
        raise SpecError(shown(problems))
    base = spec.model_dump(mode="json")
    problems = request_problems(request, spec, base, limits)
    if problems:
        raise SpecError(shown(problems))
    planned = _planned(request, spec, base)
    problems = trial_problems(planned.base, planned.trials, limits)
    if request.method == "tpe":  # its later trials are proposed from the domains: each value is checked alone
        problems += [problem for problem in domain_problems(planned.base, request.space, limits)
                     if problem.path not in {known.path for known in problems}]  # one problem per path
    if problems:
        raise SpecError(shown(problems))
    return planned


def shown(problems: list[Problem]) -> list[Problem]:
    """``problems`` with each path cut to what a reader needs: a space key may be kilobytes of nonsense."""
    return [problem if len(problem.path) <= MAX_SHOWN_PATH else
            Problem(problem.path[:MAX_SHOWN_PATH] + "…", problem.message) for problem in problems]


def _planned(request: SweepRequest, spec: JobSpec, base: dict) -> PlannedSweep:
    """The plan of a request whose fields fit its base (its trials not yet checked)."""
    metric = request.metric or default_metric(spec)
    mode = request.mode or default_mode(spec, metric)
    scheduler = None
    trial_base, rungs = base, []
    if request.scheduler is not None:
        asha = request.scheduler
        max_epochs = asha.max_epochs or spec.training.epochs
        scheduler = {"type": "asha", "min_epochs": asha.min_epochs, "max_epochs": max_epochs,
                     "reduction_factor": asha.reduction_factor}
        rungs = asha_rungs(asha.min_epochs, max_epochs, asha.reduction_factor)
        trial_base = trial_spec(base, {EPOCHS_PATH: max_epochs})
    startup = startup_trials(request)
    trials = sample_trials(request.space, request.method, request.trials if startup is None else startup,
                           request.seed)
    normalized = {"name": request.name, "base": base, "space": {p: d.as_json() for p, d in request.space.items()},
                  "method": request.method, "trials": request.trials if startup is not None else len(trials),
                  "startup_trials": startup, "parallelism": request.parallelism,
                  "metric": metric, "mode": mode, "seed": request.seed, "scheduler": scheduler}
    return PlannedSweep(normalized, trial_base, trials, rungs, metric, mode)


def request_problems(request: SweepRequest, spec: JobSpec, base: dict, limits: Limits) -> list[Problem]:
    """What is wrong with a request's fields against its (valid) base: paths, method, scheduler, metric."""
    problems = [Problem(f"space.{path}", problem) for path in request.space
                if (problem := path_problem(base, path))]
    problems += overlap_problems(list(request.space))
    problems += method_problems(request)
    problems += scheduler_problems(request, spec, limits)
    allowed = spec.metric_names()
    if request.metric is not None and request.metric not in allowed:
        problems.append(Problem("metric", unknown_name_message(request.metric, "metric this job records", allowed)))
    return problems


def startup_trials(request: SweepRequest) -> int | None:
    """tpe: how many trials are drawn at random before proposals (default min(10, trials)); None otherwise."""
    if request.method != "tpe":
        return None
    return request.startup_trials or min(DEFAULT_STARTUP_TRIALS, request.trials or 0)


def method_problems(request: SweepRequest) -> list[Problem]:
    """grid: only choices, at most MAX_TRIALS combinations, ``trials`` its size if given; random and tpe:
    ``trials``; tpe's ``startup_trials`` at most ``trials``, and nobody else's."""
    if request.method != "tpe" and request.startup_trials is not None:
        return [Problem("startup_trials", f"only for method 'tpe', not {request.method!r}")]
    if request.method in ("random", "tpe"):
        if request.trials is None:
            return [Problem("trials", f"required for method {request.method!r}")]
        if request.startup_trials is not None and request.startup_trials > request.trials:
            return [Problem("startup_trials", f"at most trials ({request.trials}), not {request.startup_trials}")]
        return []
    problems = [Problem(f"space.{path}", f"method 'grid' takes only choice domains, not {domain.kind}; "
                                         "list the values, or use method 'random'")
                for path, domain in request.space.items() if domain.kind != "choice"]
    if problems:
        return problems
    size = math.prod(len(domain.values) for domain in request.space.values())
    if size > MAX_TRIALS:
        return [Problem("space", f"the grid has {size} combinations, more than the limit of {MAX_TRIALS} trials "
                                 "(MAX_TRIALS)")]
    if request.trials is not None and request.trials != size:
        return [Problem("trials", f"the grid has {size} combinations; give trials {size} or leave it out")]
    return []


def scheduler_problems(request: SweepRequest, spec: JobSpec, limits: Limits) -> list[Problem]:
    """ASHA's epochs: 1 <= min_epochs < max_epochs <= the epochs limit, and the space leaves epochs alone."""
    asha = request.scheduler
    if asha is None:
        return []
    problems = []
    max_epochs = asha.max_epochs or spec.training.epochs
    where = "scheduler.max_epochs" if asha.max_epochs else "scheduler.min_epochs"
    if max_epochs > limits.max_epochs:
        problems.append(Problem("scheduler.max_epochs", f"{max_epochs} exceeds the limit of {limits.max_epochs} "
                                                        "(max_epochs)"))
    if asha.min_epochs >= max_epochs:
        default = "" if asha.max_epochs else ", the base's training.epochs"
        problems.append(Problem(where, f"min_epochs ({asha.min_epochs}) must be below max_epochs "
                                       f"({max_epochs}{default})"))
    problems += [Problem(f"space.{path}", f"ASHA decides how long each trial trains (up to scheduler.max_epochs); "
                                          f"{EPOCHS_PATH} can't be searched with it")
                 for path in request.space if path == EPOCHS_PATH or _inside(EPOCHS_PATH, path)]
    return problems


def trial_problems(base: dict, trials: list[dict], limits: Limits) -> list[Problem]:
    """Each trial's spec through the job gate: a problem in a param's field at ``space.<path>``, any other at
    ``base.<path>``, each naming the trial; one problem per path (the first trial that has it)."""
    found: dict[str, Problem] = {}
    for number, params in enumerate(trials):
        try:
            parse_service_spec(trial_spec(base, params), limits)
        except SpecError as exc:
            for problem in exc.problems:
                mapped = _trial_problem(number, params, problem)
                found.setdefault(mapped.path, mapped)
    return list(found.values())


def domain_problems(base: dict, space: dict[str, Domain], limits: Limits) -> list[Problem]:
    """Each numeric domain's two ends and each choice value, applied alone to the base, through the job gate:
    a trial proposed later (method tpe) then never holds a value nobody checked. One problem per path."""
    found: dict[str, Problem] = {}
    for path, domain in space.items():
        for value in domain.values:  # a choice's values, or [lo, hi]
            try:
                parse_service_spec(trial_spec(base, {path: value}), limits)
            except SpecError as exc:
                problem = exc.problems[0]
                where = "" if problem.path == path else f" ({problem.path})"
                found.setdefault(path, Problem(f"space.{path}", f"{path} = {_echo(value)}, a value method 'tpe' "
                                                                f"may propose{where}: {problem.message}"))
    return list(found.values())


def _trial_problem(number: int, params: dict, problem: Problem) -> Problem:
    for path, value in params.items():
        if problem.path == path or _inside(problem.path, path):
            return Problem(f"space.{path}", f"trial {number} with {path} = {_echo(value)}: {problem.message}")
    given = ", ".join(f"{path} = {_echo(value)}" for path, value in params.items())
    return Problem(_under("base", problem.path), f"trial {number} with {given}: {problem.message}")


def _echo(value: Any) -> str:
    """A param's value for a message, as JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= ECHO_LENGTH else quoted(text)


def _under(parent: str, path: str) -> str:
    return f"{parent}.{path}" if path and not path.startswith("[") else f"{parent}{path}"


def _inside(path: str, parent: str) -> bool:
    """Whether ``path`` names a field within ``parent`` (``a.b[0]`` is within ``a.b``, ``a.bc`` is not)."""
    return len(path) > len(parent) and path.startswith(parent) and path[len(parent)] in ".["


# --- trials -------------------------------------------------------------------------------------


def sample_trials(space: dict[str, Domain], method: str, trials: int, seed: int) -> list[dict]:
    """Each trial's params: grid, the cartesian product, in an order shuffled by ``random.Random(seed)``;
    random (and tpe's startup trials), ``trials`` draws from ``random.Random(seed)`` (path by path in key order,
    trial after trial): tpe's first n trials are random's first n.

    The grid is shuffled because trials start in their order and ASHA promotes by what has reached a rung so
    far: in the product's order the trials of one value come together (all the small learning rates first),
    and each better one that follows is promoted over those before it, so nearly all would be."""
    rng = random.Random(seed)
    if method == "grid":
        paths = list(space)
        grid = [dict(zip(paths, copy.deepcopy(values), strict=True))
                for values in itertools.product(*(space[path].values for path in paths))]
        rng.shuffle(grid)
        return grid
    return [{path: domain.sample(rng) for path, domain in space.items()} for _ in range(trials)]


def trial_spec(base: dict, params: dict) -> dict:
    """The base with params ({path: value}, paths that parse_sweep resolved) applied: a new dict, JSON."""
    spec = copy.deepcopy(base)
    for path, value in params.items():
        *parents, last = path_parts(path) or [path]
        node = spec
        for part in parents:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return spec


def asha_rungs(min_epochs: int, max_epochs: int, eta: int) -> list[int]:
    """The epochs ASHA pauses trials at: min_epochs · η^k while below max_epochs, then max_epochs."""
    rungs, epoch = [], min_epochs
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= eta
    return rungs + [max_epochs]


def default_metric(spec: JobSpec) -> str:
    """The metric a sweep ranks trials by unless it names one: early stopping's, else val_loss or loss."""
    if spec.early_stopping is not None:
        return spec.early_stopping.monitor
    return "val_loss" if spec.has_validation else "loss"


def default_mode(spec: JobSpec, metric: str) -> str:
    """Early stopping's mode when it watches the same metric, else the metric's own (accuracy: max, loss: min)."""
    stopping = spec.early_stopping
    if stopping is not None and stopping.monitor == metric and stopping.mode != "auto":
        return stopping.mode
    return "max" if higher_is_better(metric, "auto") else "min"


# --- paths --------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_INDEX = r"\[(?:0|[1-9][0-9]*)\]"
_PATH = re.compile(rf"{_NAME}(?:{_INDEX})*(?:\.{_NAME}(?:{_INDEX})*)*")
_PART = re.compile(rf"({_NAME})|\[([0-9]+)\]")
PATH_FORM = "names joined by dots, with [i] for a list's item, e.g. model.layers[0].out_features"


def path_parts(path: str) -> list[str | int] | None:
    """``model.layers[0].out_features`` -> ``["model", "layers", 0, "out_features"]``; None if not a path."""
    if not _PATH.fullmatch(path):
        return None
    return [name if name else int(index) for name, index in _PART.findall(path)]


def path_problem(base: dict, path: str) -> str | None:
    """Why ``path`` names no value of the (normalized) base spec, naming what exists where it stopped; or None."""
    too_long = text_problem(path)
    if too_long:
        return too_long
    parts = path_parts(path)
    if parts is None:
        return f"not a path: {PATH_FORM}"
    node, reached = base, ""
    for part in parts:
        if isinstance(part, int):
            if not isinstance(node, list):
                return f"{_where(reached)} is {_what(node)}, not a list: [{part}] names nothing"
            if part >= len(node):
                has = f"it has {len(node)}, [0] to [{len(node) - 1}]" if node else "it is empty"
                return f"no item [{part}] in {_where(reached)}: {has}"
            reached += f"[{part}]"
        else:
            if not isinstance(node, dict):
                hint = ": set it in the base to search what is in it" if node is None else ""
                return f"{_where(reached)} is {_what(node)}, not an object with fields{hint}"
            if part not in node:
                return f"no field {part!r} in {_where(reached)}{_did_you_mean(part, node)}; it has: {', '.join(node)}"
            reached += f".{part}" if reached else part
        node = node[part]
    return None


def _where(reached: str) -> str:
    return f"the base spec's {reached}" if reached else "the base spec"


def _what(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object")


def _did_you_mean(name: str, fields: dict) -> str:
    close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def overlap_problems(paths: list[str]) -> list[Problem]:
    """A path within another of the same space: the outer value would replace the inner one, or the inner one
    could land in a value that lacks it."""
    return [Problem(f"space.{inner}", f"within {outer}, which the space searches too; search one or the other")
            for outer in paths for inner in paths if _inside(inner, outer)]
