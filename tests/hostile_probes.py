"""The hostile-input table: one request per row, at every endpoint, with the 4xx it must get and the field (or
limit) the problem must name. tests/test_api_hostile.py runs it through the app on SQLite and PostgreSQL;
bench/abuse.py sends it over HTTP to a running service. Plain data and helpers: no pytest, no app.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from specs import circles_spec

API = "/api/v1"
# A problem answering a hostile request stays about this small, whatever the request held.
MAX_ANSWER_BYTES = 2000
PLACEHOLDER = "@@raw@@"
NUL_ID = "x%00"
HUGE_ID = "a" * 10_000


def spec_text(path: tuple = (), raw: str | None = None, **top) -> bytes:
    """The circles spec as JSON text, with ``raw`` JSON text (NaN, a 5000-digit integer, …) at ``path``."""
    spec = {**circles_spec("hostile"), **top}
    if path:
        parent = spec
        for key in path[:-1]:
            parent = parent.setdefault(key, {}) if isinstance(key, str) else parent[key]
        parent[path[-1]] = PLACEHOLDER
    return json.dumps(spec).replace(json.dumps(PLACEHOLDER), raw or "null").encode()


def with_data(data: dict) -> bytes:
    return spec_text(data=data)


def cursor_of(value) -> str:
    """A cursor token made the way the API makes them, around any JSON text or value."""
    text = value if isinstance(value, str) else json.dumps(value)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def multipart(filename: str, content: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body written by hand, so a filename may hold any byte."""
    boundary = "hostile-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Probe:
    """One hostile request: ``{job}``, ``{queued}`` and ``{dataset}`` in the path name existing rows."""

    name: str
    method: str
    path: str
    status: int
    names: str | None  # a field path among the problem's errors, or a word of its detail (a limit)
    body: bytes | None = None
    content_type: str | None = "application/json"
    headers: dict = field(default_factory=dict)


def submit(name, status, names, body, content_type="application/json", **headers) -> Probe:
    return Probe(name, "POST", f"{API}/jobs", status, names, body, content_type, headers)


def get(name, path, status, names, **headers) -> Probe:
    return Probe(name, "GET", API + path, status, names, headers=headers)


def upload(label, status, names, filename, content, **fields) -> Probe:
    body, content_type = multipart(filename, content, **fields)
    return Probe(label, "POST", f"{API}/datasets", status, names, body, content_type)


CSV = b"x1,x2,label\n0.5,1.5,0\n1.0,-2.0,1\n"
DEEP = "[" * 100_000 + "]" * 100_000
WHEN = "2020-01-01T00:00:00+00:00"
NUL_CURSOR = cursor_of([WHEN, "j\0"])
SURROGATE_CURSOR = cursor_of(f'["{WHEN}", "\\ud800"]')
NAN_CURSOR = cursor_of(f'[NaN, "{WHEN}"]')

PROBES = [
    # --- POST /jobs: the body's size, nesting and numbers (the JSON gate) ---
    submit("body nested 100000 levels", 422, "max_json_depth", DEEP.encode()),
    submit("a field nested 1000 levels", 422, "max_json_depth", spec_text(("name",), "[" * 1000 + "]" * 1000)),
    submit("body nested and never closed", 422, "max_json_depth", b'{"a": ' + b"[" * 100_000),
    submit("body over max_spec_bytes", 413, "max_spec_bytes", spec_text(name="n" * (2 * 1024 * 1024))),
    submit("NaN literal", 422, "optimizer.lr", spec_text(("optimizer", "lr"), "NaN")),
    submit("Infinity literal in params", 422, "data.params.noise", spec_text(("data", "params", "noise"),
                                                                             "Infinity")),
    submit("-Infinity literal", 422, "early_stopping.baseline", spec_text(("early_stopping", "baseline"),
                                                                          "-Infinity")),
    submit("1e999 overflows to infinity", 422, "optimizer.lr", spec_text(("optimizer", "lr"), "1e999")),
    submit("integer of 5000 digits", 422, "model.layers[0].out_features",
           spec_text(("model", "layers", 0, "out_features"), "9" * 5000)),
    submit("integer of 30 digits", 422, "model.layers[0].out_features",
           spec_text(("model", "layers", 0, "out_features"), "1" + "0" * 30)),
    submit("integer past an INTEGER column", 422, "training.epochs",
           spec_text(("training", "epochs"), str(2**40))),
    submit("seed past 64 bits", 422, "seed", spec_text(("seed",), str(2**64))),
    submit("Flatten.start_dim of 30 digits", 422, "model.layers[1].start_dim",
           spec_text(("model", "layers", 1), '{"type": "Flatten", "start_dim": 1' + "0" * 29 + "}")),
    submit("duplicate key", 422, "name", b'{"name": "a", "name": "b", "task": "binary"}'),
    # --- POST /jobs: numbers JSON holds but float32 can't ---
    submit("lr of 1e308", 422, "optimizer.lr", spec_text(("optimizer", "lr"), "1e308")),
    submit("ELU alpha of 1e308", 422, "model.layers[1].alpha",
           spec_text(("model", "layers", 1), '{"type": "ELU", "alpha": 1e308}')),
    submit("generator noise of 1e300", 422, "data.params.noise", spec_text(("data", "params", "noise"), "1e300")),
    submit("a gamma that grows lr past float32", 422, "scheduler.gamma",
           spec_text(("scheduler",), '{"type": "ExponentialLR", "gamma": 1e30}')),
    # --- POST /jobs: strings that are stored ---
    submit("NUL in name", 422, "name", spec_text(("name",), '"job\\u0000"')),
    submit("escape character in name", 422, "name", spec_text(("name",), '"job\\u001b[31m"')),
    submit("lone surrogate in name", 422, "name", spec_text(("name",), '"\\ud800"')),
    submit("name of 10000 characters", 422, "name", spec_text(("name",), json.dumps("n" * 10_000))),
    submit("empty name", 422, "name", spec_text(("name",), '""')),
    submit("NUL in a params string", 422, "data.params.random_state",
           spec_text(("data", "params", "random_state"), '"\\u0000"')),
    submit("params string of 10000 characters", 422, "data.params.noise",
           spec_text(("data", "params", "noise"), json.dumps("x" * 10_000))),
    submit("params list of 100000 numbers", 422, "data.params.noise",
           spec_text(("data", "params", "noise"), json.dumps([0] * 100_000))),
    submit("params value an object", 422, "data.params.noise", spec_text(("data", "params", "noise"), '{"a": 1}')),
    submit("NUL in dataset_id", 422, "data.dataset_id", with_data({"source": "dataset", "dataset_id": "ds\0"})),
    submit("NUL in target", 422, "data.target", with_data({"source": "dataset", "dataset_id": "ds_x",
                                                           "target": "y\0"})),
    submit("monitor of 10000 characters", 422, "early_stopping.monitor",
           spec_text(("early_stopping", "monitor"), json.dumps("m" * 10_000))),
    submit("NUL in a scheduler's monitor", 422, "scheduler.monitor",
           spec_text(("scheduler",), '{"type": "ReduceLROnPlateau", "monitor": "val_loss\\u0000"}')),
    submit("layer type of 10000 characters", 422, "model.layers[0].type",
           spec_text(("model", "layers", 0, "type"), json.dumps("L" * 10_000))),
    # --- POST /jobs: what the body is ---
    submit("body is an array", 422, "", b"[1, 2]"),
    submit("body is a string", 422, "", b'"spec"'),
    submit("body is a number", 422, "", b"7"),
    submit("body is null", 422, "", b"null"),
    submit("empty body", 400, "malformed JSON", b""),
    submit("not UTF-8", 400, "UTF-8", b'{"name": "\xff\xfe\xfd"}'),
    submit("text/plain body", 415, "JSON", spec_text(), "text/plain"),
    submit("form body", 415, "JSON", b"name=x", "application/x-www-form-urlencoded"),
    # --- POST /jobs: headers ---
    submit("NUL in Idempotency-Key", 422, "Idempotency-Key", spec_text(), **{"Idempotency-Key": "k\0"}),
    submit("Idempotency-Key of 10000 characters", 422, "Idempotency-Key", spec_text(),
           **{"Idempotency-Key": "k" * 10_000}),
    submit("empty Idempotency-Key", 422, "Idempotency-Key", spec_text(), **{"Idempotency-Key": ""}),
    # --- GET /jobs: cursor, status, limit ---
    get("cursor nested 1000 levels", f"/jobs?cursor={cursor_of('[' * 1000 + ']' * 1000)}", 422, "cursor"),
    get("cursor naming an id with NUL", f"/jobs?cursor={NUL_CURSOR}", 422, "cursor"),
    get("cursor naming an id with a surrogate", f"/jobs?cursor={SURROGATE_CURSOR}", 422, "cursor"),
    get("cursor of 10000 characters", f"/jobs?cursor={'A' * 10_000}", 422, "cursor"),
    get("cursor with NUL", "/jobs?cursor=%00", 422, "cursor"),
    get("cursor of numbers", f"/jobs?cursor={cursor_of([1, 2])}", 422, "cursor"),
    get("cursor with NaN", f"/jobs?cursor={NAN_CURSOR}", 422, "cursor"),
    get("status with NUL", "/jobs?status=queued%00", 422, "status"),
    get("status of 10000 characters", f"/jobs?status={'s' * 10_000}", 422, "status"),
    get("negative limit", "/jobs?limit=-1", 422, "limit"),
    get("limit of 5000 digits", f"/jobs?limit={'9' * 5000}", 422, "limit"),
    get("limit in other digits", "/jobs?limit=%D9%A1%D9%A0", 422, "limit"),
    get("limit with underscores", "/jobs?limit=1_0", 422, "limit"),
    # --- one job: path ids ---
    get("NUL in a job id", f"/jobs/{NUL_ID}", 404, None),
    get("job id of 10000 characters", f"/jobs/{HUGE_ID}", 404, None),
    get("surrogate bytes in a job id", "/jobs/%ED%A0%80", 404, None),
    Probe("cancel: NUL in the id", "POST", f"{API}/jobs/{NUL_ID}/cancel", 404, None),
    Probe("cancel: id of 10000 characters", "POST", f"{API}/jobs/{HUGE_ID}/cancel", 404, None),
    Probe("delete: NUL in the id", "DELETE", f"{API}/jobs/{NUL_ID}", 404, None),
    # --- metrics ---
    get("metrics: NUL in the id", f"/jobs/{NUL_ID}/metrics", 404, None),
    get("negative since_epoch", "/jobs/{job}/metrics?since_epoch=-1", 422, "since_epoch"),
    get("since_epoch of 5000 digits", "/jobs/{job}/metrics?since_epoch=" + "9" * 5000, 422, "since_epoch"),
    get("since_epoch past an INTEGER", f"/jobs/{{job}}/metrics?since_epoch={2**31}", 422, "since_epoch"),
    get("stream flag with NUL", "/jobs/{job}/metrics?stream=1%00", 422, "stream"),
    get("negative since_epoch on a stream", "/jobs/{job}/metrics?stream=1&since_epoch=-5", 422, "since_epoch"),
    get("Last-Event-ID of 5000 digits", "/jobs/{job}/metrics?stream=1", 422, "Last-Event-ID",
        **{"Last-Event-ID": "9" * 5000}),
    get("Last-Event-ID with NUL", "/jobs/{job}/metrics?stream=1", 422, "Last-Event-ID", **{"Last-Event-ID": "1\0"}),
    # --- weights and checkpoints ---
    get("weights: NUL in the id", f"/jobs/{NUL_ID}/weights", 404, None),
    get("weights format with NUL", "/jobs/{job}/weights?format=bundle%00", 422, "format"),
    get("weights format of 10000 characters", "/jobs/{job}/weights?format=" + "f" * 10_000, 422, "format"),
    get("checkpoints: NUL in the id", f"/jobs/{NUL_ID}/checkpoints", 404, None),
    get("checkpoint epoch of 30 digits", "/jobs/{job}/checkpoints/" + "9" * 30, 404, None),
    get("checkpoint epoch negative", "/jobs/{job}/checkpoints/-1", 404, None),
    get("checkpoint epoch with NUL", "/jobs/{job}/checkpoints/1%00", 404, None),
    # --- datasets ---
    get("dataset: NUL in the id", f"/datasets/{NUL_ID}", 404, None),
    get("dataset id of 10000 characters", f"/datasets/{HUGE_ID}", 404, None),
    Probe("delete dataset: NUL in the id", "DELETE", f"{API}/datasets/{NUL_ID}", 404, None),
    upload("NUL in an upload's filename", 422, "file", "data\0.csv", CSV),
    upload("NUL in an upload's name", 422, "name", "data.csv", CSV, name="my\0data"),
    upload("CSV column name of 300 characters", 422, "file", "data.csv", b"a" * 300 + b",label\n1,0\n"),
    upload("NUL in a CSV column name", 422, "file", "data.csv", b"x\0,label\n1,0\n"),
    upload("NUL in an upload's target", 422, "target", "data.csv", CSV, target="label\0"),
    upload("CSV value beyond float32", 422, "file", "data.csv", b"x1,x2,label\n1e300,1,0\n1,2,1\n"),
    Probe("JSON instead of an upload", "POST", f"{API}/datasets", 422, "file", spec_text()),
    # --- workers and health ---
    get("workers: API key of 10000 characters", "/workers", 401, None, Authorization="Bearer " + "t" * 10_000),
    get("workers: NUL in the API key", "/workers", 401, None, Authorization="Bearer ty_\0"),
    get("workers: empty bearer token", "/workers", 401, None, Authorization="Bearer "),
    Probe("health: a method it doesn't take", "POST", f"{API}/health", 405, None),
    get("health: NUL after its path", "/health/%00", 404, None),
]


def names(problem: dict, what: str) -> bool:
    """Whether a problem names ``what``: as an error's path, or in its detail."""
    return what in [e["path"] for e in problem.get("errors", [])] or (what != "" and what in problem["detail"])
