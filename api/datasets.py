"""The datasets resource: upload a CSV or NPZ file (multipart), list a page at a time, describe, delete."""

from __future__ import annotations

import os
import tempfile

from flask import Blueprint, request
from sqlalchemy import and_, or_, select

from api.auth import current_user, owned, require_user
from api.db import get_session, services
from api.errors import conflict, validation_error
from api.pagination import MAX_LIMIT, decode_cursor, encode_cursor, int_arg
from api.presenters import dataset_out, dataset_summary
from api.schemas import API_PREFIX, DatasetList, json_response, no_content
from api.upload_slots import upload_slot
from api.uploads import MAX_UNPACK_RATIO, DatasetInfo, UploadError, read_csv, read_npz
from models.settings import Settings
from models.spec import Problem
from models.tables import Dataset, Job, new_id
from models.text import quoted, text_problem

bp = Blueprint("datasets", __name__, url_prefix=f"{API_PREFIX}/datasets")
bp.before_request(require_user)

FORMATS = {".csv": "csv", ".npz": "npz"}
DEFAULT_LIMIT = 20


@bp.post("")
def upload():
    """Store an upload under a server-made name once it reads as a dataset; a 422 leaves nothing behind.
    A user has at most max_concurrent_uploads uploads in progress on an API host (429 past it)."""
    settings = services().settings
    # The slot is taken before the body is read: a refused upload costs this host nothing.
    with upload_slot(settings, current_user().id):
        return _store_upload(settings)


def _store_upload(settings: Settings):
    # Touching request.files reads the body (to a temporary file past 500 KB); past MAX_CONTENT_LENGTH, 413.
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise _invalid("file", "send the dataset as the multipart form field 'file'")
    _check_text("file", upload.filename, "the filename ")
    fmt = FORMATS.get(os.path.splitext(upload.filename)[1].lower())
    if fmt is None:
        raise _invalid("file", f"{quoted(upload.filename)} is neither a .csv nor a .npz file")
    target = request.form.get("target") or None
    if target is not None:
        _check_text("target", target)
    if fmt == "npz" and target:
        raise _invalid("target", "an NPZ dataset holds arrays X and y; target is for CSV files")
    name = request.form.get("name") or upload.filename
    _check_text("name", name)
    store = services().store
    dataset_id = new_id("ds")
    with tempfile.TemporaryDirectory(prefix="torchyard-upload-") as folder:
        local = os.path.join(folder, "upload")
        upload.save(local)
        info = _read(local, fmt, target, settings)
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


def _read(path: str, fmt: str, target: str | None, settings: Settings) -> DatasetInfo:
    try:
        if fmt == "csv":
            return read_csv(path, target, settings.max_samples, settings.max_columns)
        return read_npz(path, settings.max_samples, settings.max_upload_bytes * MAX_UNPACK_RATIO)
    except UploadError as exc:
        raise _invalid(exc.path, str(exc)) from None


def _check_text(path: str, value: str, what: str = "") -> None:
    """Refuse a form field (or the filename) that isn't stored text: too long, a control character."""
    problem = text_problem(value)
    if problem:
        raise _invalid(path, what + problem)


def _invalid(path: str, message: str):
    return validation_error([Problem(path, message)], "Invalid dataset")


@bp.get("")
def list_datasets():
    """The caller's datasets, newest first, a page at a time; column names only in a dataset's own page."""
    limit = int_arg(request.args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query = select(Dataset).where(Dataset.user_id == current_user().id)
    cursor = request.args.get("cursor")
    if cursor:
        created, ident = decode_cursor(cursor)
        query = query.where(
            or_(Dataset.created_at < created, and_(Dataset.created_at == created, Dataset.id < ident))
        )
    # One row more than the page tells whether a next page exists.
    order = (Dataset.created_at.desc(), Dataset.id.desc())
    rows = get_session().scalars(query.order_by(*order).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return json_response(DatasetList(datasets=[dataset_summary(d) for d in page], next_cursor=next_cursor))


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
    return no_content()
