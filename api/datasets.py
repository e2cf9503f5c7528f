"""The datasets resource: upload a CSV or NPZ file (multipart), list a page at a time, describe, delete."""

from __future__ import annotations

import logging
import os
import tempfile

from flask import Blueprint, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import current_user, owned, require_user
from api.db import get_session, services
from api.errors import conflict, not_found, validation_error
from api.pagination import MAX_LIMIT, after_cursor, encode_cursor, int_arg, one_arg
from api.presenters import dataset_out, dataset_summary
from api.schemas import API_PREFIX, DatasetList, json_response, no_content
from api.upload_slots import upload_slot
from api.uploads import MAX_UNPACK_RATIO, DatasetInfo, UploadError, read_csv, read_npz
from models import audit, quotas
from models.db import locked_row
from models.settings import Settings
from models.spec import Problem
from models.sweep_spec import trial_spec
from models.tables import FINISHED_STATUSES, Dataset, Job, Sweep, new_id
from models.text import quoted, text_problem

log = logging.getLogger(__name__)

bp = Blueprint("datasets", __name__, url_prefix=f"{API_PREFIX}/datasets")
bp.before_request(require_user)

FORMATS = {".csv": "csv", ".npz": "npz"}
DEFAULT_LIMIT = 20
# A multipart body is its file and a few hundred bytes more (boundaries, part headers, the filename, name and
# target, each at most 200 characters): a body longer than the room left by more than this can't hold a file
# that fits, and one within it may.
MULTIPART_FRAMING = 64 * 1024


@bp.post("")
def upload():
    """Store an upload under a server-made name once it reads as a dataset; a 422 leaves nothing behind.
    A user has at most max_concurrent_uploads uploads in progress on an API host (429 past it), and stores at
    most their storage_bytes quota (403 past it)."""
    settings = services().settings
    if request.content_length is not None:  # a body announced too long for the room is refused unread
        adding = max(request.content_length - MULTIPART_FRAMING, 0)
        quotas.require(get_session(), settings, current_user(), "storage_bytes", adding)
    # The slot is taken before the body is read: a refused upload costs this host nothing.
    with upload_slot(settings, current_user().id):
        return _store_upload(settings)


def _store_upload(settings: Settings):
    # Touching request.files reads the body (to a temporary file past 500 KB); past MAX_CONTENT_LENGTH, 413.
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise _invalid("file", "send the dataset as the multipart form field 'file'")
    _check_text("file", upload.filename, "the filename: ")
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
    try:
        # The stored size, counted under a lock on the user's row held until the commit: concurrent uploads
        # of one user take turns, so together they stay within the quota.
        quotas.require_locked(session, settings, current_user().id, "storage_bytes", size)
        session.add(dataset)
        audit.record(session, current_user(), "upload", dataset.id, name=name, format=fmt, size=size)
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
    cursor = one_arg(request.args, "cursor")
    if cursor:
        query = query.where(after_cursor(cursor, Dataset.created_at, Dataset.id))
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
    """Delete a dataset, then its file; 409 while a queued or running job names it."""
    session = get_session()
    owner = owned(session, Dataset, dataset_id, "dataset").user_id  # the 404 of a missing or another's dataset
    dataset = lock_dataset(session, owner, dataset_id)
    if dataset is None:  # a concurrent delete of the same dataset won
        raise not_found("dataset", dataset_id)
    users = dataset_users(session, dataset)
    if users:
        raise conflict(f"dataset {dataset.id} is used by unfinished job(s) {', '.join(users)}")
    sweeps = dataset_sweeps(session, dataset)
    if sweeps:
        raise conflict(f"dataset {dataset.id} is read by the trials of running sweep(s) {', '.join(sweeps)}; "
                       "cancel them, or wait for their end")
    session.delete(dataset)
    audit.record(session, current_user(), "delete", dataset.id, name=dataset.name)
    session.commit()
    # The file goes only after the row: a row whose file is gone would still pass a submit's check, and
    # its job would fail at the worker. A file whose row is gone is unreachable (its name is random).
    _remove_file(dataset.uri)
    return no_content()


def lock_dataset(session: Session, user_id: str, dataset_id: str) -> Dataset | None:
    """The user's dataset, read under a lock held until the transaction ends; None if there is none.

    A submit on the dataset holds it from its check to the job's insert, a delete from its look for users
    to the row's delete: so a job is stored only while its dataset stays, and a dataset is deleted only
    while no unfinished job names it.
    """
    return locked_row(session, select(Dataset).where(Dataset.id == dataset_id, Dataset.user_id == user_id))


def dataset_users(session: Session, dataset: Dataset) -> list[str]:
    """The ids of the owner's unfinished jobs whose spec names the dataset, oldest first.

    The database reads the spec's JSON (``json_extract`` on SQLite, ``#>>`` on PostgreSQL): no spec is loaded.
    """
    named = Job.spec[("data", "dataset_id")].as_string()
    return list(session.scalars(
        select(Job.id)
        .where(Job.user_id == dataset.user_id, Job.status.not_in(FINISHED_STATUSES), named == dataset.id)
        .order_by(Job.created_at, Job.id)
    ))


def dataset_sweeps(session: Session, dataset: Dataset) -> list[str]:
    """The ids of the owner's running sweeps whose trials may read the dataset (their base, or a value of their
    space, names it): such a sweep starts new trials until it ends."""
    running = session.execute(select(Sweep.id, Sweep.base, Sweep.trials, Sweep.request)
                              .where(Sweep.user_id == dataset.user_id, Sweep.status == "running")
                              .order_by(Sweep.created_at, Sweep.id))
    return [sweep_id for sweep_id, base, trials, request in running
            if any(trial_spec(base, params).get("data", {}).get("dataset_id") == dataset.id
                   for params in [*trials, *choice_params(request)])]


def choice_params(request: dict) -> list[dict]:
    """Each choice value of a tpe sweep's space alone ({path: value}): a trial it proposes later may hold it."""
    if request.get("method") != "tpe":
        return []
    return [{path: value} for path, domain in request["space"].items() for value in domain.get("choice", [])]


def _remove_file(uri: str) -> None:
    try:
        services().store.delete(uri)
    except OSError:
        # The delete the user asked for is done (no row names the file), so it isn't theirs to retry.
        log.exception("the file %s of a deleted dataset could not be removed; it is left over", uri)
