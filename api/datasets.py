"""The datasets resource: upload a CSV or NPZ file (multipart), list, delete."""

from __future__ import annotations

import os
import tempfile

from flask import Blueprint, Response, request
from sqlalchemy import select

from api.auth import current_user, owned, require_user
from api.db import get_session, services
from api.errors import conflict, validation_error
from api.presenters import dataset_out
from api.schemas import API_PREFIX, DatasetList, json_response
from api.uploads import MAX_UNPACK_RATIO, DatasetInfo, UploadError, read_csv, read_npz
from models.spec import Problem
from models.tables import Dataset, Job, new_id

bp = Blueprint("datasets", __name__, url_prefix=f"{API_PREFIX}/datasets")
bp.before_request(require_user)

FORMATS = {".csv": "csv", ".npz": "npz"}


@bp.post("")
def upload():
    """Store an upload under a server-made name once it reads as a dataset; a 422 leaves nothing behind."""
    # Touching request.files reads the body; past MAX_CONTENT_LENGTH that is a 413.
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise _invalid("file", "send the dataset as the multipart form field 'file'")
    fmt = FORMATS.get(os.path.splitext(upload.filename)[1].lower())
    if fmt is None:
        raise _invalid("file", f"{upload.filename!r} is neither a .csv nor a .npz file")
    target = request.form.get("target") or None
    if fmt == "npz" and target:
        raise _invalid("target", "an NPZ dataset holds arrays X and y; target is for CSV files")
    name = (request.form.get("name") or upload.filename)[:200]
    settings, store = services().settings, services().store
    dataset_id = new_id("ds")
    with tempfile.TemporaryDirectory(prefix="torchyard-upload-") as folder:
        local = os.path.join(folder, "upload")
        upload.save(local)
        info = _read(local, fmt, target, settings.max_samples, settings.max_upload_bytes * MAX_UNPACK_RATIO)
        uri, size, sha256 = store.put_file(local, f"datasets/{dataset_id}.{fmt}")
    dataset = Dataset(
        id=dataset_id,
        user_id=current_user().id,
        name=name,
        format=fmt,
        uri=uri,
        size=size,
        sha256=sha256,
        n_rows=info.n_rows,
        n_features=info.n_features,
        n_targets=info.n_targets,
        n_classes=info.n_classes,
        target=info.target,
        columns=info.columns,
    )
    session = get_session()
    session.add(dataset)
    try:
        session.commit()
    except BaseException:
        store.delete(uri)  # no row, no file
        raise
    return json_response(
        dataset_out(dataset), status=201, headers={"Location": f"{API_PREFIX}/datasets/{dataset.id}"}
    )


def _read(path: str, fmt: str, target: str | None, max_rows: int, max_bytes: int) -> DatasetInfo:
    try:
        return read_csv(path, target, max_rows) if fmt == "csv" else read_npz(path, max_rows, max_bytes)
    except UploadError as exc:
        raise _invalid(exc.path, str(exc)) from None


def _invalid(path: str, message: str):
    return validation_error([Problem(path, message)], "Invalid dataset")


@bp.get("")
def list_datasets():
    """The caller's datasets, newest first."""
    rows = (
        get_session()
        .scalars(
            select(Dataset)
            .where(Dataset.user_id == current_user().id)
            .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        )
        .all()
    )
    return json_response(DatasetList(datasets=[dataset_out(d) for d in rows]))


@bp.get("/<dataset_id>")
def get_dataset(dataset_id: str):
    """One dataset's description."""
    return json_response(dataset_out(owned(get_session(), Dataset, dataset_id, "dataset")))


@bp.delete("/<dataset_id>")
def delete_dataset(dataset_id: str):
    """Delete a dataset and its file; 409 while a queued or running job still reads it."""
    session = get_session()
    dataset = owned(session, Dataset, dataset_id, "dataset")
    active = session.scalars(
        select(Job).where(Job.user_id == dataset.user_id, Job.status.in_(("queued", "running")))
    ).all()
    users = [job.id for job in active if (job.spec.get("data") or {}).get("dataset_id") == dataset.id]
    if users:
        raise conflict(f"dataset {dataset.id} is used by unfinished job(s) {', '.join(users)}")
    services().store.delete(dataset.uri)
    session.delete(dataset)
    session.commit()
    return Response(status=204)
