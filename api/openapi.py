"""The OpenAPI 3.1 document. Paths, methods, path parameters, tags, summaries and security come from the
app's routes and views; schemas from the pydantic models that validate specs and shape responses; what
neither can say (answers, query and header parameters, bodies) from a table keyed by endpoint."""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from flask import Flask
from pydantic.json_schema import models_json_schema
from werkzeug.routing import Rule

from api.artifacts import WEIGHT_FORMATS
from api.auth import require_user
from api.epoch_rows import METRICS_PAGE
from api.logs import FORMATS as LOG_FORMATS
from api.pagination import MAX_INT, MAX_LIMIT
from api.rate_limits import rate_limited
from api.schemas import (
    API_PREFIX,
    AuditList,
    CheckpointList,
    DatasetList,
    DatasetOut,
    HealthOut,
    IndexOut,
    JobList,
    JobOut,
    LogsOut,
    MeOut,
    MetricsOut,
    NetworkOut,
    ProblemOut,
    SweepList,
    SweepOut,
    TagList,
    TrialList,
    WorkerList,
)
from api.tags import MAX_LIMIT as TAGS_MAX_LIMIT
from models.audit import ACTIONS
from models.spec import MAX_TAGS, JobSpec
from models.tables import JOB_STATUSES
from models.text import MAX_NAME_LENGTH, MAX_TAG_LENGTH

RESPONSE_MODELS = (
    JobOut,
    JobList,
    SweepOut,
    SweepList,
    TrialList,
    MetricsOut,
    LogsOut,
    NetworkOut,
    CheckpointList,
    DatasetOut,
    DatasetList,
    WorkerList,
    MeOut,
    AuditList,
    HealthOut,
    IndexOut,
    ProblemOut,
    TagList,
)
REF = "#/components/schemas/{model}"
# A rule's variable part: <name>, or <converter:name> with the converter's arguments if any.
VARIABLE = re.compile(r"<(?:(?P<converter>[^>:(]+)(?:\([^>]*\))?:)?(?P<name>\w+)>")
# A path parameter's schema by its converter, any other matching a string; an int past an INTEGER column's
# range names no row (the views answer 404).
CONVERTER_SCHEMAS = {"int": {"type": "integer", "minimum": 0, "maximum": MAX_INT}}
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Flask answers these for every rule by itself


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _binary(description: str, *mimetypes: str) -> dict:
    content = {mimetype: {"schema": {"type": "string", "contentMediaType": mimetype}} for mimetype in mimetypes}
    return {"description": description, "content": content}


def _param(name: str, where: str, schema: dict, description: str = "") -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, "description": description}


def sse_event(events: list[str], id_description: str, data_description: str) -> dict:
    """One event of a job's stream, as OpenAPI 3.1 describes a text/event-stream item (3.2's itemSchema)."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": events},
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": id_description},
            "data": {"type": "string", "contentMediaType": "application/json", "description": data_description},
            "retry": {"type": "integer"},
        },
    }


SSE_EVENT = sse_event(
    ["metrics", "status"], "the epoch of a metrics event",
    'metrics: one epoch\'s row, {"epoch": 3, "loss": 0.4, ...}; '
    "status: the finished job (as JobOut), after which the stream ends",
)
METRICS = {
    "description": f"metrics in epoch order (application/json), at most {METRICS_PAGE} epochs an answer: "
    "next_since_epoch says where the next page starts (null: no more yet); or, when asked for with Accept: "
    "text/event-stream or stream=true, a Server-Sent Events stream: one `metrics` event per new epoch (`id` "
    "is its epoch), a `status` event with the job once it has finished, then the end of the stream; a "
    "comment keeps the connection alive every 2 s, and a stream ends after an hour: reconnect with "
    "Last-Event-ID. Streams are limited per user and per API process: over a limit, 429 with Retry-After.",
    "content": {
        "application/json": {"schema": _ref("MetricsOut")},
        "text/event-stream": {"schema": SSE_EVENT},
    },
}
LOG_EVENT = sse_event(
    ["log", "end"], "the seq of a log event's line",
    'log: one line, {"seq": 7, "time": "…", "attempt": 1, "level": "INFO", "text": "…"}; '
    'end: {"status": "succeeded"} once the job has finished and every line was sent; the stream ends',
)
LOGS = {
    "description": "the log's lines in seq order (application/json); with format=text the log as text/plain, a "
    "line a line (time, level, attempt, text); or, asked for with Accept: text/event-stream or stream=true, a "
    "Server-Sent Events stream as the metrics' one: a `log` event per new line (`id` is its seq), then `end`. "
    "Lines past TORCHYARD_MAX_LOG_LINES are dropped (one line says so), each is cut to "
    "TORCHYARD_MAX_LOG_LINE_LENGTH characters.",
    "content": {
        "application/json": {"schema": _ref("LogsOut")},
        "text/plain": {"schema": {"type": "string"}},
        "text/event-stream": {"schema": LOG_EVENT},
    },
}
WEIGHTS = _binary(
    "safetensors (application/octet-stream), or with format=bundle a .tar.gz (application/gzip) of the "
    "weights, model card and metrics",
    "application/octet-stream",
    "application/gzip",
)
SPEC_BODY = {"required": True, "content": {"application/json": {"schema": _ref("JobSpec")}}}
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "description": "a .csv file (a header row naming the columns, spaces around "
                        "names dropped; then finite numbers) or a .npz file (exactly the numeric arrays X and y)",
                    },
                    "name": {"type": "string", "maxLength": 200, "description": "default: the filename"},
                    "target": {"type": "string", "maxLength": 200, "description": "CSV target column"},
                },
            }
        }
    },
}
SWEEP_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["name", "base", "space"],
                "description": "a base job spec, a search space over its paths, a method and a scheduler; see the "
                "README's Sweeps section",
                "properties": {
                    "name": {"type": "string", "maxLength": MAX_NAME_LENGTH},
                    "base": _ref("JobSpec"),
                    "space": {"type": "object", "description": 'spec path -> domain: {"choice": [...]}, '
                              '{"uniform": [lo, hi]}, {"log_uniform": [lo, hi]} or {"int_uniform": [lo, hi]}'},
                    "method": {"enum": ["grid", "random", "tpe"]},
                    "trials": {"type": "integer", "minimum": 1},
                    "startup_trials": {"type": ["integer", "null"], "minimum": 1,
                                       "description": "tpe: random trials before proposals (default min(10, trials))"},
                    "parallelism": {"type": "integer", "minimum": 1},
                    "metric": {"type": "string"},
                    "mode": {"enum": ["min", "max"]},
                    "seed": {"type": "integer"},
                    "scheduler": {"type": ["object", "null"], "description": '{"type": "asha", "min_epochs": 2, '
                                  '"max_epochs": 18, "reduction_factor": 3}'},
                },
            }
        }
    },
}
DELETED = {204: {"description": "deleted"}}
PROBLEM_STATUSES = {
    400: "malformed request",
    401: "missing, invalid, revoked or expired API key",
    403: "not allowed: admins only, or over a quota that waiting won't free (storage_bytes)",
    404: "not found (or not yours)",
    409: "not possible in the current state",
    413: "body too large (a spec past max_spec_bytes, an upload past max_upload_bytes)",
    415: "not JSON",
    422: "validation failed; `errors` names each field",
    429: "too many: past a rate limit, or a quota or limit that waiting frees; try again after Retry-After seconds",
}


@dataclass(frozen=True)
class Details:
    """What an operation's rule and view can't say: its answers, its problems besides the 401 of an API
    key and the 404 of a path naming no row, its query and header parameters, its request body."""

    responses: dict
    errors: tuple[int, ...] = ()
    params: tuple[dict, ...] = ()
    body: dict | None = None


DETAILS = {
    "jobs.submit": Details(
        {201: _json("JobOut", "the new job"), 200: _json("JobOut", "the job an earlier request with this key made")},
        errors=(400, 413, 415, 422),
        params=(
            _param(
                "Idempotency-Key",
                "header",
                {"type": "string", "maxLength": 200},
                "a retried request with the same key returns the first job",
            ),
        ),
        body=SPEC_BODY,
    ),
    "jobs.list_jobs": Details(
        {200: _json("JobList", "a page of jobs")},
        errors=(422,),
        params=(
            _param("status", "query", {"enum": list(JOB_STATUSES)}),
            _param("tag", "query",
                   {"type": "array", "maxItems": MAX_TAGS, "items": {"type": "string", "maxLength": MAX_TAG_LENGTH}},
                   "only jobs carrying this tag; repeat it (tag=a&tag=b) for jobs carrying every one"),
            _param("experiment", "query", {"type": "string", "maxLength": MAX_NAME_LENGTH},
                   "only the jobs of this experiment"),
            _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page (same filters)"),
        ),
    ),
    "jobs.get_job": Details({200: _json("JobOut", "the job")}),
    "jobs.delete_job": Details(DELETED, errors=(409,)),
    "jobs.metrics": Details(
        {200: METRICS},
        errors=(422, 429),
        params=(
            _param(
                "since_epoch",
                "query",
                {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                f"only the epochs after this one; a JSON answer holds at most {METRICS_PAGE} of them (its "
                "next_since_epoch is the value for the next page)",
            ),
            _param(
                "max_points",
                "query",
                {"type": "integer", "minimum": 2, "maximum": METRICS_PAGE},
                "at most this many of the epochs after since_epoch, evenly spaced, the first and the last always "
                "(for charts; a stream refuses it: 422)",
            ),
            _param(
                "stream",
                "query",
                {"type": "boolean"},
                "true: answer with text/event-stream (as does Accept: text/event-stream)",
            ),
            _param(
                "Last-Event-ID",
                "header",
                {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                "a reconnecting stream's last epoch; it takes the place of since_epoch",
            ),
        ),
    ),
    "logs.logs": Details(
        {200: LOGS},
        errors=(422, 429),
        params=(
            _param("since_seq", "query", {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                   "only the lines after this seq"),
            _param("format", "query", {"enum": list(LOG_FORMATS)}, "text: the log as text/plain, to download"),
            _param("stream", "query", {"type": "boolean"},
                   "true: answer with text/event-stream (as does Accept: text/event-stream)"),
            _param("Last-Event-ID", "header", {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                   "a reconnecting stream's last seq; it takes the place of since_seq"),
        ),
    ),
    "jobs.cancel": Details(
        {
            200: _json("JobOut", "a queued job, now cancelled"),
            202: _json("JobOut", "a running job, asked to stop at its next batch"),
        },
        errors=(409,),
    ),
    "sweeps.submit": Details(
        {201: _json("SweepOut", "the new sweep, its first trials queued"),
         200: _json("SweepOut", "the sweep an earlier request with this key made")},
        errors=(400, 403, 413, 415, 422, 429),
        params=(_param("Idempotency-Key", "header", {"type": "string", "maxLength": 200},
                       "a retried request with the same key returns the first sweep"),),
        body=SWEEP_BODY,
    ),
    "sweeps.list_sweeps": Details(
        {200: _json("SweepList", "a page of sweeps")},
        errors=(422,),
        params=(
            _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ),
    ),
    "sweeps.get_sweep": Details({200: _json("SweepOut", "the sweep")}),
    "sweeps.trials": Details({200: _json("TrialList", "the trials started so far, by number")}),
    "sweeps.cancel": Details({202: _json("SweepOut", "the sweep, cancelled; its running trials stop at their "
                                                     "next batch")}, errors=(409,)),
    "sweeps.delete_sweep": Details(DELETED, errors=(409,)),
    "network.network": Details({200: _json("NetworkOut", "the layers")}),
    "artifacts.weights": Details(
        {200: WEIGHTS}, errors=(409, 422), params=(_param("format", "query", {"enum": list(WEIGHT_FORMATS)}),)
    ),
    "artifacts.checkpoints": Details({200: _json("CheckpointList", "checkpoints")}),
    "artifacts.checkpoint": Details({200: _binary("the checkpoint file", "application/octet-stream")}),
    "datasets.upload": Details(
        {201: _json("DatasetOut", "the stored dataset")}, errors=(403, 413, 422, 429), body=UPLOAD_BODY
    ),
    "datasets.list_datasets": Details(
        {200: _json("DatasetList", "a page of datasets")},
        errors=(422,),
        params=(
            _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ),
    ),
    "datasets.get_dataset": Details({200: _json("DatasetOut", "the dataset")}),
    "datasets.delete_dataset": Details(DELETED, errors=(409,)),
    "workers.list_workers": Details({200: _json("WorkerList", "capacity per queue; for admins, each worker")}),
    "me.me": Details({200: _json("MeOut", "the caller")}),
    "audit.list_events": Details(
        {200: _json("AuditList", "a page of events")},
        errors=(403, 422),
        params=(
            _param("user", "query", {"type": "string", "maxLength": 200}, "only this user's events"),
            _param("action", "query", {"enum": list(ACTIONS)}, "only this action's events"),
            _param("since", "query", {"type": "string", "format": "date-time"},
                   "only events at or after this time (ISO 8601; UTC unless it names an offset)"),
            _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ),
    ),
    "tags.list_tags": Details(
        {200: _json("TagList", "tags with their counts of jobs")},
        errors=(422,),
        params=(_param("limit", "query", {"type": "integer", "minimum": 1, "maximum": TAGS_MAX_LIMIT}),),
    ),
    "health.health": Details({200: _json("HealthOut", "healthy, or degraded: jobs stall for want of a worker"),
                              503: _json("HealthOut", "a dependency is down")}),
    "health.index": Details({200: _json("IndexOut", "the service, its version and links to its parts")}),
    "health.openapi": Details({200: {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}),
}


def _secured(app: Flask, blueprint: str) -> bool:
    """Whether the blueprint (or the whole app) asks for an API key before each request."""
    return any(require_user in app.before_request_funcs.get(scope, ()) for scope in (None, blueprint))


def _problems(*codes: int) -> dict:
    content = {"application/problem+json": {"schema": _ref("ProblemOut")}}
    return {code: {"description": PROBLEM_STATUSES[code], "content": content} for code in codes}


def _operation(app: Flask, rule: Rule) -> dict:
    """The operation of one rule: derived from the rule and its view, completed by the endpoint's details."""
    summary, _, description = (inspect.getdoc(app.view_functions[rule.endpoint]) or "").partition("\n")
    details = DETAILS.get(rule.endpoint, Details({}))
    blueprint = rule.endpoint.rpartition(".")[0]
    path_params = [
        _param(match["name"], "path", CONVERTER_SCHEMAS.get(match["converter"], {"type": "string"}))
        for match in VARIABLE.finditer(rule.rule)
    ]
    secured = _secured(app, blueprint)
    errors = [401] if secured else []
    if path_params:
        errors.append(404)  # an id in the path may name no row, or someone else's
    if rate_limited(rule.endpoint):
        errors.append(429)
    responses = {**details.responses, **_problems(*errors, *details.errors)}
    operation = {
        "operationId": rule.endpoint,
        "tags": [blueprint] if blueprint else [],
        "summary": summary,
        "description": description.strip(),
        "parameters": path_params + list(details.params),
        "requestBody": details.body,
        "responses": {str(code): value for code, value in responses.items()},
    }
    operation = {key: value for key, value in operation.items() if value}
    return operation if secured else {**operation, "security": []}


def _paths(app: Flask) -> dict:
    """One operation per method of each rule under the API prefix; ``<int:epoch>`` becomes ``{epoch}``."""
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(f"{API_PREFIX}/"):
            path = VARIABLE.sub(r"{\g<name>}", rule.rule)
            for method in sorted(rule.methods - IGNORED_METHODS):
                paths.setdefault(path, {})[method.lower()] = _operation(app, rule)
    return paths


@functools.cache
def _schemas() -> dict:
    """The components' schemas (built once; they depend only on code)."""
    pairs = [(JobSpec, "validation")] + [(model, "serialization") for model in RESPONSE_MODELS]
    _, schemas = models_json_schema(pairs, ref_template=REF)
    return schemas["$defs"]


def openapi_document(app: Flask) -> dict:
    """The OpenAPI 3.1 document of ``app``'s API routes."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "torchyard",
            "version": "1",
            "description": "Training-as-a-service: POST a JSON spec of a PyTorch training run, "
            "follow its metrics, download its weights. Errors are RFC 9457 problem+json.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(app),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key: Authorization: Bearer ty_…",
                }
            },
        },
    }
