"""The OpenAPI 3.1 document, built from the same pydantic models that validate specs and shape responses."""

from __future__ import annotations

import functools

from pydantic.json_schema import models_json_schema

from api.pagination import MAX_INT
from api.schemas import (
    API_PREFIX,
    CheckpointList,
    DatasetList,
    DatasetOut,
    HealthOut,
    JobList,
    JobOut,
    MetricsOut,
    ProblemOut,
    WorkerList,
)
from models.spec import JobSpec
from models.tables import JOB_STATUSES

RESPONSE_MODELS = (
    JobOut,
    JobList,
    MetricsOut,
    CheckpointList,
    DatasetOut,
    DatasetList,
    WorkerList,
    HealthOut,
    ProblemOut,
)
REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _binary(description: str, mimetype: str = "application/octet-stream") -> dict:
    return {
        "description": description,
        "content": {mimetype: {"schema": {"type": "string", "contentMediaType": mimetype}}},
    }


def _weights_content() -> dict:
    binary = {"type": "string", "contentMediaType": "application/octet-stream"}
    return {
        "description": "safetensors (application/octet-stream), or with format=bundle a .tar.gz "
        "(application/gzip) of the weights, model card and metrics",
        "content": {
            "application/octet-stream": {"schema": binary},
            "application/gzip": {"schema": {"type": "string", "contentMediaType": "application/gzip"}},
        },
    }


# One event of the metrics stream, as OpenAPI 3.1 describes a text/event-stream item (3.2's itemSchema).
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["metrics", "status"]},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the epoch of a metrics event"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": 'metrics: one epoch\'s row, {"epoch": 3, "loss": 0.4, ...}; '
            "status: the finished job (as JobOut), after which the stream ends",
        },
        "retry": {"type": "integer"},
    },
}
METRICS_STREAM_DESCRIPTION = (
    "metrics in epoch order (application/json); or, when asked for with Accept: text/event-stream or "
    "stream=true, a Server-Sent Events stream: one `metrics` event per new epoch (`id` is its epoch), a "
    "`status` event with the job once it has finished, then the end of the stream; a comment keeps the "
    "connection alive every 15 s, and a stream ends after an hour: reconnect with Last-Event-ID."
)


def _metrics_content() -> dict:
    return {
        "description": METRICS_STREAM_DESCRIPTION,
        "content": {
            "application/json": {"schema": _ref("MetricsOut")},
            "text/event-stream": {"schema": SSE_EVENT},
        },
    }


PROBLEM_STATUSES = {
    400: "malformed request",
    401: "missing or invalid API key",
    404: "not found (or not yours)",
    409: "not possible in the current state",
    413: "upload too large",
    415: "not JSON",
    422: "validation failed; `errors` names each field",
    500: "unexpected error",
}


def _op(
    summary: str,
    responses: dict,
    *,
    errors=(401, 404),
    params=(),
    body: dict | None = None,
    public: bool = False,
) -> dict:
    operation = {"summary": summary, "responses": {str(code): value for code, value in responses.items()}}
    for code in errors:
        operation["responses"][str(code)] = {
            "description": PROBLEM_STATUSES[code],
            "content": {"application/problem+json": {"schema": _ref("ProblemOut")}},
        }
    if params:
        operation["parameters"] = list(params)
    if body:
        operation["requestBody"] = body
    if public:
        operation["security"] = []
    return operation


def _param(name: str, where: str, schema: dict, description: str = "") -> dict:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


JOB_ID = _param("job_id", "path", {"type": "string"})
DATASET_ID = _param("dataset_id", "path", {"type": "string"})


def _paths() -> dict:
    jobs, datasets = f"{API_PREFIX}/jobs", f"{API_PREFIX}/datasets"
    spec_body = {"required": True, "content": {"application/json": {"schema": _ref("JobSpec")}}}
    upload_body = {
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
                            "description": "a .csv (header, numeric columns) or .npz (arrays X and y) file",
                        },
                        "name": {"type": "string"},
                        "target": {"type": "string", "description": "CSV target column"},
                    },
                }
            }
        },
    }
    return {
        jobs: {
            "post": _op(
                "Submit a job",
                {
                    201: _json("JobOut", "the new job"),
                    200: _json("JobOut", "the job an earlier request with this key made"),
                },
                errors=(400, 401, 415, 422),
                body=spec_body,
                params=[
                    _param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "maxLength": 200},
                        "a retried request with the same key returns the first job",
                    )
                ],
            ),
            "get": _op(
                "List the caller's jobs, newest first",
                {200: _json("JobList", "a page of jobs")},
                errors=(401, 422),
                params=[
                    _param("status", "query", {"enum": list(JOB_STATUSES)}),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100}),
                    _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
                ],
            ),
        },
        f"{jobs}/{{job_id}}": {
            "get": _op("Read a job", {200: _json("JobOut", "the job")}, params=[JOB_ID]),
            "delete": _op(
                "Delete a finished job and its files",
                {204: {"description": "deleted"}},
                errors=(401, 404, 409),
                params=[JOB_ID],
            ),
        },
        f"{jobs}/{{job_id}}/metrics": {
            "get": _op(
                "Per-epoch metrics, or a live stream of them",
                {200: _metrics_content()},
                errors=(401, 404, 422),
                params=[
                    JOB_ID,
                    _param(
                        "since_epoch",
                        "query",
                        {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                        "only the epochs after this one",
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
                ],
            )
        },
        f"{jobs}/{{job_id}}/weights": {
            "get": _op(
                "Download the final weights",
                {200: _weights_content()},
                errors=(401, 404, 409, 422),
                params=[JOB_ID, _param("format", "query", {"enum": ["safetensors", "bundle"]})],
            )
        },
        f"{jobs}/{{job_id}}/checkpoints": {
            "get": _op(
                "List the kept checkpoints", {200: _json("CheckpointList", "checkpoints")}, params=[JOB_ID]
            )
        },
        f"{jobs}/{{job_id}}/checkpoints/{{epoch}}": {
            "get": _op(
                "Download a checkpoint",
                {200: _binary("the checkpoint file")},
                params=[JOB_ID, _param("epoch", "path", {"type": "integer", "minimum": 0, "maximum": MAX_INT})],
            )
        },
        f"{jobs}/{{job_id}}/cancel": {
            "post": _op(
                "Cancel a job",
                {
                    200: _json("JobOut", "a queued job, now cancelled"),
                    202: _json("JobOut", "a running job, asked to stop at its next batch"),
                },
                errors=(401, 404, 409),
                params=[JOB_ID],
            )
        },
        datasets: {
            "post": _op(
                "Upload a dataset",
                {201: _json("DatasetOut", "the stored dataset")},
                errors=(401, 413, 422),
                body=upload_body,
            ),
            "get": _op("List the caller's datasets", {200: _json("DatasetList", "datasets")}, errors=(401,)),
        },
        f"{datasets}/{{dataset_id}}": {
            "get": _op("Read a dataset", {200: _json("DatasetOut", "the dataset")}, params=[DATASET_ID]),
            "delete": _op(
                "Delete a dataset",
                {204: {"description": "deleted"}},
                errors=(401, 404, 409),
                params=[DATASET_ID],
            ),
        },
        f"{API_PREFIX}/workers": {
            "get": _op("Live workers", {200: _json("WorkerList", "workers")}, errors=(401,))
        },
        f"{API_PREFIX}/health": {
            "get": _op(
                "Liveness with dependency checks",
                {200: _json("HealthOut", "healthy"), 503: _json("HealthOut", "a dependency is down")},
                errors=(),
                public=True,
            )
        },
        f"{API_PREFIX}/openapi.json": {
            "get": _op(
                "This document",
                {200: {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                errors=(),
                public=True,
            )
        },
    }


@functools.cache
def openapi_document() -> dict:
    """The whole OpenAPI 3.1 document (built once; it depends only on code)."""
    pairs = [(JobSpec, "validation")] + [(model, "serialization") for model in RESPONSE_MODELS]
    _, schemas = models_json_schema(pairs, ref_template=REF)
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
        "paths": _paths(),
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key: Authorization: Bearer ty_…",
                }
            },
        },
    }
