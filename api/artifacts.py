"""A job's files: final weights (safetensors, or a bundle for ``torchyard.load_model``) and checkpoints."""

from __future__ import annotations

import tarfile
import tempfile
from typing import IO

from flask import Blueprint, Response, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import current_user, owned, require_user
from api.db import get_session, services
from api.errors import ApiError, conflict, not_found, validation_error
from api.pagination import MAX_INT, one_arg
from api.schemas import API_PREFIX, CheckpointList, CheckpointOut, as_utc, json_response
from models import audit, lifecycle
from models.spec import Problem, unknown_name_message
from models.tables import Artifact, Job

bp = Blueprint("artifacts", __name__, url_prefix=f"{API_PREFIX}/jobs")
bp.before_request(require_user)

CHUNK = 1024 * 1024
WEIGHT_FORMATS = ("safetensors", "bundle")
# The files a bundle holds, by artifact kind; the first two are what load_model needs.
BUNDLE_KINDS = ("weights", "model_card", "metrics")
SPOOL_BYTES = 32 * 1024 * 1024


@bp.get("/<job_id>/weights")
def weights(job_id: str):
    """The final weights as safetensors, or ``?format=bundle``: a .tar.gz with model card and metrics."""
    fmt = one_arg(request.args, "format", "safetensors")
    if fmt not in WEIGHT_FORMATS:
        raise validation_error(
            [Problem("format", unknown_name_message(fmt, "weights format", WEIGHT_FORMATS))],
            "Invalid query argument",
        )
    session = get_session()
    job = owned(session, Job, job_id, "job")
    artifacts = {
        a.kind: a
        for a in session.scalars(
            select(Artifact).where(Artifact.job_id == job.id, Artifact.kind.in_(BUNDLE_KINDS))
        )
    }
    if "weights" not in artifacts:
        raise no_weights(job)
    if fmt == "safetensors":
        return downloaded(session, job, stream_artifact(artifacts["weights"], f"{job.id}.safetensors"), "weights")
    if "model_card" not in artifacts:
        raise conflict(f"job {job.id} has weights but no model card yet, so no bundle")
    return downloaded(session, job, bundle(job, [artifacts[kind] for kind in BUNDLE_KINDS if kind in artifacts]),
                      "bundle")


def no_weights(job: Job) -> ApiError:
    """Why a job has no weights: 409 while it may still make them, 404 once it ended without them."""
    if not lifecycle.is_finished(job.status):
        return conflict(f"job {job.id} has no weights yet: it is {job.status}, and they are stored when it "
                        "succeeds")
    reason = job.error or job.stop_reason
    said = f"job {job.id} was cancelled before it stored weights" if job.status == "cancelled" else \
        f"job {job.id} {job.status} without weights"
    # A cancelled job's stop reason is "cancelled": said once, not as its own reason.
    return ApiError(404, "No weights", said + (f": {reason}" if reason and reason != job.status else ""),
                    kind="no-weights")


@bp.get("/<job_id>/checkpoints")
def checkpoints(job_id: str):
    """The checkpoints the job keeps, oldest first, each with its download link."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    rows = session.scalars(
        select(Artifact)
        .where(Artifact.job_id == job.id, Artifact.kind == "checkpoint")
        .order_by(Artifact.epoch, Artifact.name)
    ).all()
    return json_response(
        CheckpointList(
            checkpoints=[
                CheckpointOut(
                    epoch=a.epoch,
                    name=a.name,
                    size=a.size,
                    sha256=a.sha256,
                    created_at=as_utc(a.created_at),
                    download=f"{API_PREFIX}/jobs/{job.id}/checkpoints/{a.epoch}",
                )
                for a in rows
            ]
        )
    )


@bp.get("/<job_id>/checkpoints/<int:epoch>")
def checkpoint(job_id: str, epoch: int):
    """One checkpoint file."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    if epoch > MAX_INT:  # past any stored epoch, and past what the database's INTEGER can be compared with
        raise not_found("checkpoint of epoch", str(epoch))
    artifact = session.scalar(
        select(Artifact).where(
            Artifact.job_id == job.id, Artifact.kind == "checkpoint", Artifact.epoch == epoch
        )
    )
    if artifact is None:
        raise not_found("checkpoint of epoch", str(epoch))
    return downloaded(session, job, stream_artifact(artifact, f"{job.id}-epoch-{epoch:04d}.pt"), "checkpoint",
                      epoch=epoch)


def downloaded(session: Session, job: Job, response: Response, what: str, **detail) -> Response:
    """``response``, once its download is in the audit log: a GET commits nothing else, so the event gets
    a small commit of its own, made only when the file could be opened."""
    try:
        audit.record(session, current_user(), "download", job.id, what=what, **detail)
        session.commit()
    except BaseException:
        response.close()  # closes the opened file
        raise
    return response


def stream_artifact(artifact: Artifact, download_name: str) -> Response:
    """Stream a stored file as an attachment, chunk by chunk (weights can be large)."""
    source = open_stored(artifact)
    response = Response(
        _chunks(source),
        mimetype="application/octet-stream",
        headers={
            "Content-Length": str(artifact.size),
            "Content-Disposition": f'attachment; filename="{download_name}"',
            "ETag": f'"{artifact.sha256}"',
        },
    )
    response.call_on_close(source.close)
    return response


def open_stored(artifact: Artifact) -> IO[bytes]:
    """The artifact's stored file; 404 when it is gone (its job is being deleted: files go before rows)."""
    try:
        return services().store.open(artifact.uri)
    except FileNotFoundError:
        raise not_found("file", artifact.name) from None


def bundle(job: Job, members: list[Artifact]) -> Response:
    """A .tar.gz with ``weights.safetensors``, ``model.json`` and ``metrics.jsonl`` at its top: unpacked
    into a folder (``tar xzf JOB.tar.gz -C model/``), or as it is, ``torchyard.load_model`` reads it."""
    # Small bundles stay in memory; large ones spill to a temporary file, never the whole weights in RAM.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 closed by the response
    try:
        with tarfile.open(fileobj=spool, mode="w:gz") as tar:
            for artifact in members:
                info = tarfile.TarInfo(artifact.name)
                info.size, info.mode = artifact.size, 0o644
                info.mtime = int(as_utc(artifact.created_at).timestamp())
                with open_stored(artifact) as source:
                    tar.addfile(info, source)
    except BaseException:
        spool.close()
        raise
    size = spool.tell()
    spool.seek(0)
    response = Response(
        _chunks(spool),
        mimetype="application/gzip",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{job.id}.tar.gz"',
        },
    )
    response.call_on_close(spool.close)
    return response


def _chunks(source: IO[bytes]):
    while chunk := source.read(CHUNK):
        yield chunk
