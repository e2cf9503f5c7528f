"""Fuzzing the API over real HTTP with schemathesis, from the OpenAPI document the API serves.

Each operation gets its own fresh database (SQLite, then PostgreSQL) and server, some existing rows to aim
at (a finished job with metrics and files, a queued job, an uploaded dataset), and a bounded number of
generated requests, valid and invalid, with alice's key, with none, or with a bad one. Every response must
be one the document describes, never a 5xx or a stack trace; errors are problem+json; a refused request
writes nothing. Besides what schemathesis draws from the document (NUL allowed), some requests carry one
hostile value the document's generators seldom reach: a control character, thousands of characters or
digits, deep nesting, in a path id, a query argument, a header or the spec; each must be refused (4xx).

The API publishes through the conftest's recording publisher: the broker is the API's one true edge, and
counting what it published checks "a created job is published once, a refused one never" without a
broker's files to sift.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from sqlalchemy import func, select

from api import create_app
from api.openapi import openapi_document
from models.tables import Artifact, Dataset, EpochMetrics, Job, Sweep

# The API's operations, read off an app that never opens its database, store or broker.
DESCRIBED = create_app({"database_url": "sqlite://", "artifacts_url": "memory://fuzz", "broker_url": "redis://127.0.0.1:1/0"})
OPERATIONS = [f"{method.upper()} {path}"
              for path, item in openapi_document(DESCRIBED)["paths"].items() for method in item]
# Per operation (16 of them) and database (2): about a thousand requests in all.
MAX_EXAMPLES = 40
TRACE_MARKERS = ("Traceback", 'File "', '.py", line')
# Requests that follow the document may still be refused (422) for what JSON Schema can't say: whether a
# network fits its data and limits, whether a cursor is one the API made, whether an upload is a CSV, whether
# a date-time is one Python reads (year 1 west of UTC is before year 1 in UTC).
SEMANTIC_422 = (("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/datasets"),
                ("GET", "/api/v1/audit"), ("POST", "/api/v1/sweeps"), ("GET", "/api/v1/sweeps"))
CONFIG = {
    # The API ignores query parameters it doesn't know, as most HTTP APIs do (a client's cache buster,
    # a newer client's option): an unknown parameter is not invalid data here. NUL is fair game.
    "generation": {"allow-extra-parameters": False, "allow-x00": True},
    "operations": [
        {
            "include-method": method,
            "include-path": path,
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "422"]}},
        }
        for method, path in SEMANTIC_422
    ]
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Both backends: PostgreSQL refuses what SQLite stores (NUL), so a value may be a 500 on one only."""
    return request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def app(make_app):
    """The API with a metrics stream that ends quickly: the fuzzer may ask for one on a queued job."""
    return make_app(METRICS_STREAM_POLL_SECONDS=0.05, METRICS_STREAM_MAX_SECONDS=0.3)


@pytest.fixture
def targets(live_server, tokens, spec, set_job, add_artifact, sessions) -> dict[str, list]:
    """Rows of alice's for generated requests to aim at, besides the random ids that miss."""
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    finished = requests.post(f"{live_server}/api/v1/jobs", json=spec, headers=headers, timeout=10).json()["id"]
    queued = requests.post(f"{live_server}/api/v1/jobs", json=spec, headers=headers, timeout=10).json()["id"]
    with sessions() as session:
        session.add_all(EpochMetrics(job_id=finished, epoch=e, attempt=1, values={"loss": 1 / e}) for e in (1, 2))
        session.commit()
    add_artifact(finished, "checkpoint", "checkpoint-0002.pt", b"c" * 100, epoch=2)
    add_artifact(finished, "weights", "weights.safetensors", b"w" * 100)
    add_artifact(finished, "model_card", "model.json", b"{}")
    set_job(finished, status="succeeded", epoch=2)
    upload = {"file": ("points.csv", io.BytesIO(b"x,y\n1,0\n2,1\n"), "text/csv")}
    dataset = requests.post(f"{live_server}/api/v1/datasets", files=upload, headers=headers, timeout=10)
    with sessions() as session:  # a running and an ended sweep, as rows: a POST would publish their trials
        owner = session.get(Job, finished).user_id
        sweeps = [Sweep(user_id=owner, name=f"s{status}", request={"method": "random", "trials": 1, "parallelism": 1},
                        base=spec, trials=[{}], rungs=[], metric="loss", mode="min", status=status)
                  for status in ("running", "succeeded")]
        session.add_all(sweeps)
        session.commit()
        sweep_ids = [sweep.id for sweep in sweeps]
    return {"job_id": [finished, queued], "dataset_id": [dataset.json()["id"]], "epoch": [2], "sweep_id": sweep_ids}


def valid_specs(spec: dict):
    """Runnable job specs: the conftest's circles network with a few of its numbers changed."""
    return st.builds(
        lambda epochs, lr, width, device: {
            **spec,
            "model": {"layers": [{"type": "Linear", "out_features": width}, {"type": "ReLU"},
                                 {"type": "Linear", "out_features": 1}]},
            "optimizer": {"type": "Adam", "lr": lr},
            "training": {"epochs": epochs, "batch_size": 50},
            "resources": {"device": device},
        },
        st.integers(1, 10_000),
        st.floats(1e-6, 1.0),
        st.integers(1, 512),
        st.sampled_from(["auto", "cpu", "cuda"]),
    )


def valid_sweeps(spec: dict):
    """Sweeps that can run: the circles spec's learning rate searched, a few trials, maybe with ASHA."""
    return st.builds(
        lambda low, trials, asha: {
            "name": "fuzzed", "base": spec, "space": {"optimizer.lr": {"log_uniform": [low, low * 10]}},
            "method": "random", "trials": trials, "parallelism": 2,
            "scheduler": {"type": "asha", "max_epochs": 4} if asha else None,
        },
        st.floats(1e-6, 0.01),
        st.integers(1, 8),
        st.booleans(),
    )


# Hostile values: each breaks a rule of the gate (a control character, past 200 characters, past an
# INTEGER, past 64 bits, deeper than max_json_depth), so each must be refused. Sizes stay under what the
# test server's request line and header limits (64 KB) take, and under what json.dumps can print.
CONTROL = st.characters(codec="latin-1", categories=["Cc"])
HOSTILE_TEXT = st.one_of(
    st.builds(lambda head, control, tail: head + control + tail, st.text(max_size=10), CONTROL, st.text(max_size=10)),
    st.builds(lambda char, n: char * n, st.sampled_from(["a", "é", "[", "%", "9", "\x00"]), st.integers(201, 5000)),
)
# Header values travel as latin-1, without CR or LF, and requests won't send one that starts with a space.
HOSTILE_HEADER = st.one_of(
    st.builds(lambda head, control: head + control, st.text(st.characters(codec="latin-1", exclude_characters="\r\n"),
                                                            max_size=10), CONTROL.filter(lambda c: c not in "\r\n")),
    st.builds(lambda char, n: char * n, st.sampled_from(["k", "9", "\x00"]), st.integers(201, 8000)),
).filter(lambda value: not value[:1].isspace())
HOSTILE_NUMBER = st.one_of(
    st.integers(max_value=-1).map(str),
    st.integers(min_value=2**31).map(str),
    st.integers(11, 4000).map(lambda n: "9" * n),
    st.sampled_from(["1_0", "\u0661\u0660", " 7", "7\x00", "1e3", "NaN"]),
)
INTEGER_PARAMETERS = {"limit", "since_epoch", "epoch", "Last-Event-ID"}
# What a parameter needs beside it to be read at all: Last-Event-ID only resumes a stream.
NEEDS = {"Last-Event-ID": {"query": {"stream": "true"}}}
HOSTILE_SPEC_VALUES = {
    ("name",): HOSTILE_TEXT,
    ("data", "params", "random_state"): HOSTILE_TEXT,
    ("early_stopping", "monitor"): HOSTILE_TEXT,
    ("model", "layers", 0, "out_features"): st.integers(min_value=2**31, max_value=10**4000),
    ("training", "epochs"): st.integers(min_value=2**31, max_value=10**4000),
    ("seed",): st.integers(min_value=2**64, max_value=10**4000),
    ("data", "params"): st.integers(33, 500).map(lambda depth: {"noise": json.loads("[" * depth + "]" * depth)}),
}


def hostile_spec(spec: dict):
    """The circles spec with one hostile value in it."""

    def put(path: tuple, value) -> dict:
        changed = json.loads(json.dumps(spec))
        parent = changed
        for key in path[:-1]:
            parent = parent.setdefault(key, {}) if isinstance(key, str) else parent[key]
        parent[path[-1]] = value
        return changed

    return st.one_of([values.map(functools.partial(put, path)) for path, values in HOSTILE_SPEC_VALUES.items()])


def hostile_requests(operation, spec: dict):
    """Requests of this operation that carry one hostile value: a path id, a query argument, a header, or
    a value of the spec; None for an operation that takes no input."""
    options = []
    for where, parameters in (("path_parameters", operation.path_parameters), ("query", operation.query),
                              ("headers", operation.headers)):
        for parameter in parameters:
            if parameter.name == "Authorization":
                continue  # the bogus and missing keys are drawn below
            if parameter.name in INTEGER_PARAMETERS:
                values = HOSTILE_NUMBER if where != "headers" else HOSTILE_NUMBER.filter(
                    lambda value: value.isascii() and not value[:1].isspace())
            else:
                values = HOSTILE_HEADER if where == "headers" else HOSTILE_TEXT
            needs = NEEDS.get(parameter.name, {})
            options.append(values.flatmap(lambda value, where=where, name=parameter.name, needs=needs:
                                          operation.as_strategy(**{**needs, where: {name: value}})))
    if (operation.method.upper(), operation.path) == ("POST", "/api/v1/jobs"):
        options.append(hostile_spec(spec).flatmap(lambda body: operation.as_strategy(body=body)))
    return st.one_of(options) if options else None


def count_rows(sessions) -> dict[str, int]:
    with sessions() as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model))
            for model in (Job, Dataset, Artifact, EpochMetrics, Sweep)
        }


def strategy(operation, targets: dict[str, list], spec: dict):
    """(hostile, case): valid and invalid requests, valid ones whose path names an existing row, and
    requests with one hostile value."""
    options = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    if (operation.method.upper(), operation.path) == ("POST", "/api/v1/jobs"):
        # Generated specs almost never describe a network that fits its data; these do, so jobs get made.
        options.append(valid_specs(spec).flatmap(lambda body: operation.as_strategy(body=body)))
    if (operation.method.upper(), operation.path) == ("POST", "/api/v1/sweeps"):
        options.append(valid_sweeps(spec).flatmap(lambda body: operation.as_strategy(body=body)))
    names = {p.name for p in operation.path_parameters}
    if names:
        # The kept checkpoint's epoch, or any whole number (past what an INTEGER column holds, too).
        pick = {name: st.sampled_from(targets[name]) for name in names}
        if "epoch" in pick:
            pick["epoch"] = st.one_of(pick["epoch"], st.integers(min_value=0))
        known = st.fixed_dictionaries(pick)
        options.append(known.flatmap(lambda path: operation.as_strategy(path_parameters=path)))
    drawn = st.tuples(st.just(False), st.one_of(options))
    hostile = hostile_requests(operation, spec)
    return drawn if hostile is None else st.one_of(drawn, st.tuples(st.just(True), hostile))


def use_key(case, authorization: str | None) -> None:
    """Send this Authorization value (or none) where the case sends one; schemathesis generates a random
    token there, and leaving it out is one of its invalid cases, which stays as it is. Schemathesis sees
    the edit and checks the response against the request as sent."""
    if case.headers and "Authorization" in case.headers:
        if authorization is None:
            del case.headers["Authorization"]
        else:
            case.headers["Authorization"] = authorization


def check_response(case, response, before: dict, after: dict) -> None:
    """What every response must be, beyond schemathesis's checks."""
    status, body = response.status_code, response.content
    assert status < 500, f"{case.method} {case.formatted_path}: {status} {body[:500]!r}"
    leaked = [marker for marker in TRACE_MARKERS if marker.encode() in body]
    assert not leaked, f"a stack trace in the body: {body[:500]!r}"
    if status >= 400:
        text = body.decode()
        assert response.headers.get("content-type") == ["application/problem+json"], text[:200]
        assert json.loads(text)["status"] == status
        assert after == before, f"a refused request ({status}) changed rows: {before} -> {after}"


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzed_requests_get_documented_answers_and_refusals_write_nothing(
    label, live_server, tokens, admin, live_worker, targets, spec, sessions, store, published
):
    schema = schemathesis.openapi.from_url(
        f"{live_server}/api/v1/openapi.json", config=schemathesis.Config.from_dict(CONFIG)
    )
    operation = schema.find_operation_by_label(label)
    # The audit log is for admins: there, alice's key would be refused (403) before any argument is read.
    own = admin["Authorization"] if label == "GET /api/v1/audit" else f"Bearer {tokens['alice']}"
    keys = {"alice": own, "bogus": "Bearer ty_not-a-key", "none": None}
    start_jobs = count_rows(sessions)["jobs"]
    created: list[str] = []
    http = requests.Session()

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(drawn=strategy(operation, targets, spec), key=st.sampled_from(["alice", "alice", "bogus", "none"]))
    def fuzz(drawn, key):
        hostile, case = drawn
        use_key(case, keys[key])
        before = count_rows(sessions)
        response = case.call(base_url=live_server, session=http, timeout=30)
        check_response(case, response, before, count_rows(sessions))
        if hostile:
            # Refused, whatever else the case holds; schemathesis's own acceptance checks would judge the
            # hostile value by the document's schema, which can't say "no control characters".
            assert 400 <= response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code}"
            case.validate_response(response, excluded_checks=[positive_data_acceptance, negative_data_rejection])
        else:
            case.validate_response(response)
        if label == "POST /api/v1/jobs" and response.status_code == 201:
            created.append(json.loads(response.text)["id"])
        if label == "POST /api/v1/sweeps" and response.status_code == 201:
            created.append(json.loads(response.text)["id"])

    fuzz()

    # A job row, and one publish, for each 201 and for nothing else.
    if label == "POST /api/v1/jobs":
        assert count_rows(sessions)["jobs"] == start_jobs + len(set(created))
        assert [job_id for job_id, _ in published[2:]] == created
    elif label == "POST /api/v1/sweeps":  # a new sweep's first trials are jobs, published as any job is
        with sessions() as session:
            trials = set(session.scalars(select(Job.id).where(Job.sweep_id.in_(created))))
        assert created and count_rows(sessions)["jobs"] == start_jobs + len(trials)
        assert {job_id for job_id, _ in published[2:]} <= trials
    else:
        assert len(published) == 2  # the two target jobs
    # The store holds the files of existing rows and nothing else (no upload left behind by a refusal).
    with sessions() as session:
        uris = set(session.scalars(select(Dataset.uri))) | set(session.scalars(select(Artifact.uri)))
    files = {str(path) for path in Path(store.root).rglob("*") if path.is_file()}
    assert files == {store.path(uri) for uri in uris}
