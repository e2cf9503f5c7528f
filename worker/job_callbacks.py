"""The engine callbacks that tie a run to its job row: metrics, checkpoint uploads, lease and cancel.

Every write is fenced by the attempt number: ``UPDATE jobs ... WHERE id = :id AND attempts = :attempt
AND status = 'running'``. No row means another attempt owns the job now (the reaper requeued it), so
this one raises LeaseLost and writes nothing more.

An epoch's rows (its metrics, its checkpoint's artifact row, the rows of the checkpoints it prunes) are one
transaction, written once the epoch's end is done (``Fence.defer``): a commit is a round trip and a WAL
flush, and a small job's epochs are milliseconds long. Those transactions and the lease renewals don't wait
for the flush (PostgreSQL's asynchronous commit, ``durable=False``): a crash of the database's machine may
lose their last fraction of a second (whole transactions, never half of one), which the attempt that resumes
from the newest checkpoint row left writes again. Claims and ends wait, as does a transaction after which
files are deleted (a lost delete of a row would point at a deleted file).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Row, delete, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from models import lifecycle
from models.db import upsert
from models.quotas import restate_stored_bytes
from models.services import Services
from models.storage import job_prefix
from models.tables import Artifact, EpochMetrics, Job, new_id, utcnow
from worker.engine import PAUSED, Callback, RunState, StopTraining
from worker.job_log import JobLog

CANCEL_CHECK_SECONDS = 1.0  # a cancel is seen within a second, without a query every batch
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds between tries of a write while the database is unreachable;
# the last one repeats until the lease would have run out

log = logging.getLogger(__name__)
T = TypeVar("T")
_DEFERRED = "torchyard.deferred"  # session.info: (how many deferred writes it made, what follows their commit)
_LAZY = "torchyard.lazy_commit"  # session.info: its commit doesn't wait for the WAL flush
_ARTIFACTS = "torchyard.artifacts_changed"  # session.info: it changed the job's artifact rows (restate them)


class LeaseLost(Exception):
    """This attempt no longer owns its job; stop at once and write nothing more."""


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for a whole lease: the attempt stops without writing (it can't), and
    the reaper requeues the job once the database is back and the lease has run out."""


def database_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the database can't be reached now (restarting, connection dropped), rather
    than that a statement was wrong: the write may simply be tried again on a fresh connection."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def finite(value: Any) -> Any:
    """NaN and infinities as None (PostgreSQL's JSON has no such numbers); other values as they are."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def finite_values(values: dict[str, Any]) -> dict[str, Any]:
    """A metrics row that any database stores as JSON."""
    return {key: finite(value) for key, value in values.items()}


class Fence:
    """The one attempt of one job that may write its row."""

    def __init__(self, ctx: Services, job_id: str, attempt: int, queue: str, log: JobLog | None = None):
        self.ctx = ctx
        self.job_id = job_id
        self.attempt = attempt
        self.queue = queue  # where a hand-back publishes the job again
        self.log = log  # the attempt's log lines ride along with its renewals
        # Why the attempt gives the job back, when it does: the worker shuts down, or the dispatcher asked.
        self.hand_back_reason = "requeued: its worker shut down"
        # Writes waiting for this attempt's next fenced transaction (``defer``), in order.
        self.deferred: list[Callable[[Session], Callable[[], None] | None]] = []

    def update(self, session: Session, **progress: Any) -> Row:
        """Renew the lease (recording ``progress``) if this attempt still owns the job, then make the deferred
        writes; LeaseLost otherwise.

        Returns the row's ``cancel_requested`` and ``preempt_reason``. A lost lease rolls the transaction back:
        nothing of it lands.
        """
        row = self.renew_lease(session, **progress)
        self._write_deferred(session)
        return row

    def renew_lease(self, session: Session, **progress: Any) -> Row:
        """``update`` without the deferred writes (for the renewals of ``keep_alive``'s thread)."""
        row = lifecycle.renew(session, self.job_id, self.attempt, self.ctx.settings.lease_seconds, **progress)
        if row is None:
            session.rollback()
            raise LeaseLost(f"job {self.job_id}: attempt {self.attempt} lost its lease")
        if self.log is not None:
            self.log.write(session)
        return row

    def require(self, session: Session, matched: bool) -> None:
        """Raise LeaseLost (rolling back) unless a lifecycle write of this attempt matched its row; then make
        the deferred writes."""
        if not matched:
            session.rollback()
            raise LeaseLost(f"job {self.job_id}: attempt {self.attempt} lost its lease")
        self._write_deferred(session)

    def defer(self, work: Callable[[Session], Callable[[], None] | None]) -> None:
        """Make ``work(session)`` part of this attempt's next fenced transaction (``update`` or ``require``);
        what it returns, if anything, is called once that transaction has committed."""
        self.deferred.append(work)

    def _write_deferred(self, session: Session) -> None:
        then = [after for work in self.deferred if (after := work(session)) is not None]
        session.info[_DEFERRED] = (len(self.deferred), then)
        if then and session.info.pop(_LAZY, False):  # files are deleted once it commits: it must last
            session.execute(text("SET LOCAL synchronous_commit = on"))

    def _deferred_committed(self, session: Session) -> None:
        """Forget the deferred writes ``session`` committed and run what follows them."""
        written, then = session.info.pop(_DEFERRED, (0, []))
        del self.deferred[:written]
        for after in then:
            after()

    def transaction(self, work: Callable[[Session], T], durable: bool = True) -> T:
        """Run ``work(session)`` and commit; while the database is unreachable, again on a new connection.

        A database restart drops every connection: the run waits it out instead of failing the job. Each
        ``work`` is one transaction of idempotent writes (fenced updates, upserts), so a second try is safe.
        After ``lease_seconds`` of trying it raises DatabaseUnavailable: by then the lease may be gone.
        ``durable=False``: the commit doesn't wait for PostgreSQL's WAL flush (see the module's docstring).
        """
        deadline = time.monotonic() + self.ctx.settings.lease_seconds
        for tries in itertools.count():
            try:
                with self.ctx.sessions() as session:
                    try:
                        if not durable and session.get_bind().dialect.name == "postgresql":
                            session.execute(text("SET LOCAL synchronous_commit = off"))
                            session.info[_LAZY] = True
                        result = work(session)
                        if session.info.pop(_ARTIFACTS, False):  # once, however many rows it changed
                            restate_stored_bytes(session, self.job_id)
                        session.commit()
                    except BaseException:
                        self._settle_log(session, committed=False)
                        raise
                    self._settle_log(session, committed=True)
                    self._deferred_committed(session)
                return result
            except DBAPIError as exc:
                delay = RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)]
                if not database_down(exc):
                    raise
                # One retry on a fresh connection always: a process that was frozen (SIGSTOP) may wake
                # past the deadline to a connection the server closed, and must still learn it lost the job.
                if tries and time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(f"job {self.job_id}: database unavailable for "
                                              f"{self.ctx.settings.lease_seconds} s") from exc
                log.warning("job %s: database unavailable (%s); trying again in %s s", self.job_id,
                            " ".join(str(exc.orig or exc).split())[:200], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # for type checkers: count() never ends

    def _settle_log(self, session: Session, committed: bool) -> None:
        """The log lines ``session`` wrote are stored, or (rolled back) wait for the next transaction."""
        if self.log is not None:
            (self.log.written if committed else self.log.unwritten)(session)

    def renew(self) -> bool:
        """Renew the lease (and make the deferred writes) in its own transaction; return whether a cancel was
        requested."""
        return self.transaction(self.update).cancel_requested

    @contextlib.contextmanager
    def keep_alive(self) -> Iterator[threading.Event]:
        """Renew the lease from a thread while the attempt downloads, loads data or uploads.

        Setting the yielded event ends the renewals early: the training loop renews the lease itself
        (LeaseKeeper), so a hung loop still loses its lease.
        """
        done = threading.Event()

        def renew_until_done() -> None:
            while not done.wait(self.ctx.settings.heartbeat_seconds):
                try:  # the lease only: the deferred writes are the attempt's own thread's
                    self.transaction(self.renew_lease, durable=False)
                except LeaseLost:
                    return  # the next fenced write of the attempt itself stops it
                except Exception:  # the attempt's own fenced writes report a lasting outage
                    log.warning("job %s: lease renewal failed", self.job_id, exc_info=True)

        thread = threading.Thread(target=renew_until_done, name=f"lease-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield done
        finally:
            done.set()
            thread.join()

    @property
    def first(self) -> bool:
        """Whether this is the job's first attempt. Attempts only grow, so the first finds nothing of an
        earlier one: no checkpoint to resume, no rows or files to clean up."""
        return self.attempt == 1

    @property
    def prefix(self) -> str:
        """Where this attempt's uploads go: under its own folder, so an attempt that lost the job and uploads
        on waking can't overwrite a file the job's rows point at (their SHA-256 would no longer match)."""
        return f"{job_prefix(self.job_id)}/attempt-{self.attempt}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"


def checkpoint_name(path: Path) -> str:
    """The artifact name of a checkpoint file, the same relative path as in the run's folder."""
    return f"checkpoints/{path.name}"


def record_artifacts(session: Session, job_id: str, stored: list[tuple[str, str, tuple[str, int, str], int | None]],
                     ) -> None:
    """Insert or replace the (job, name) artifact row of each (kind, name, (uri, size, sha256), epoch), in one
    statement of a fenced transaction (``Fence.transaction`` then counts the job's stored bytes again)."""
    if not stored:
        return
    rows = [{"id": new_id("art"), "job_id": job_id, "kind": kind, "name": name, "uri": uri, "size": size,
             "sha256": sha256, "epoch": epoch, "created_at": utcnow()}
            for kind, name, (uri, size, sha256), epoch in stored]
    upsert(session, Artifact, rows, [Artifact.job_id, Artifact.name], ("kind", "uri", "size", "sha256", "epoch"))
    session.info[_ARTIFACTS] = True


def remove_unreferenced(fence: Fence, key: str) -> list[str]:
    """Delete the files under ``key`` that no artifact row of the job points at; return their URIs.

    They were uploaded by an attempt that lost the job (or died) before recording them. Best effort: a
    failure is logged, since a leftover file costs space, never correctness (deleting the job removes it).
    """
    try:
        with fence.ctx.sessions() as session:
            referenced = set(session.scalars(select(Artifact.uri).where(Artifact.job_id == fence.job_id)))
        orphans = [uri for uri in fence.ctx.store.list_uris(key) if uri not in referenced]
        for uri in orphans:
            fence.ctx.store.delete(uri)
        return orphans
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("job %s: could not remove unreferenced files under %s", fence.job_id, key, exc_info=True)
        return []


class DatabaseMetrics(Callback):
    """Each epoch: its EpochMetrics row and the job's progress and best, in one fenced transaction with the
    epoch's checkpoint rows."""

    def __init__(self, fence: Fence):
        self.fence = fence

    def on_train_begin(self, state: RunState) -> None:
        # A resumed run starts at its checkpoint: drop rows of later epochs that a lost attempt wrote
        # (this attempt writes them again).
        if self.fence.first:
            return  # no earlier attempt left rows to drop (the fenced epoch writes renew the lease)
        progress = self.progress(state)

        def write(session: Session) -> None:
            self.fence.update(session, epoch=state.epoch, **progress)
            session.execute(delete(EpochMetrics).where(EpochMetrics.job_id == self.fence.job_id,
                                                       EpochMetrics.epoch > state.epoch))

        self.fence.transaction(write)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        row = {"job_id": self.fence.job_id, "epoch": metrics["epoch"], "attempt": self.fence.attempt,
               "values": finite_values(metrics),
               "created_at": utcnow()}  # the epoch's end, not when the database write got through

        def write(session: Session) -> None:
            # An upsert by (job_id, epoch): a resumed attempt replaces a row, adds none.
            upsert(session, EpochMetrics, row, [EpochMetrics.job_id, EpochMetrics.epoch],
                   ("attempt", "values", "created_at"))

        self.fence.defer(write)

    def on_epoch_done(self, state: RunState) -> None:
        progress = self.progress(state)
        self.fence.transaction(lambda session: self.fence.update(session, epoch=state.epoch, **progress),
                               durable=False)

    def progress(self, state: RunState) -> dict[str, Any]:
        """The job row's best_* columns: the trainer's best so far."""
        if state.best is None:
            return {}
        return {"best_metric": state.best.metric, "best_value": finite(state.best.value),
                "best_epoch": state.best.epoch}


class ArtifactUploader(Callback):
    """Mirrors the run's checkpoints into the artifact store, each with an Artifact row.

    Which ones go is the trainer's checkpoint policy: it names each one it drops, an earlier attempt's
    too, in on_checkpoint_removed.
    """

    def __init__(self, fence: Fence):
        self.fence = fence

    def on_checkpoint(self, state: RunState, path: Path, epoch: int) -> None:
        # No renewal before the upload: it goes under this attempt's own folder (Fence.prefix), so an attempt
        # that lost the job overwrites no file a row points at, and its row write fails instead.
        name = checkpoint_name(path)
        stored = self.fence.ctx.store.put_file(str(path), self.fence.key(name))
        self.fence.defer(lambda session: record_artifacts(session, self.fence.job_id,
                                                          [("checkpoint", name, stored, epoch)]))

    def on_checkpoint_removed(self, state: RunState, path: Path, epoch: int) -> None:
        def write(session: Session) -> Callable[[], None]:
            uris = list(session.scalars(
                delete(Artifact).where(Artifact.job_id == self.fence.job_id, Artifact.name == checkpoint_name(path))
                .returning(Artifact.uri).execution_options(synchronize_session=False)))
            session.info[_ARTIFACTS] = True

            def delete_files() -> None:  # rows first, files once they are committed: the API never lists a
                for uri in uris:  # checkpoint whose file is gone
                    self.fence.ctx.store.delete(uri)

            return delete_files

        self.fence.defer(write)


class PauseAt(Callback):
    """Pauses the run once it completed epoch ``stop_at_epoch`` (the job row's: a sweep's rung): the run ends
    there as a stop at an epoch end does (checkpoint, weights, card, metrics), and a resume from that
    checkpoint goes on. An earlier stop (early stopping) wins; the last epoch is an end, not a pause."""

    def __init__(self, stop_at_epoch: int):
        self.stop_at_epoch = stop_at_epoch

    def on_train_begin(self, state: RunState) -> None:
        # Resumed at or past it already (its attempt died while recording the pause): pause again at once,
        # training nothing, so the pause lands on the epoch asked for.
        self.pause_after(state, state.epoch)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        self.pause_after(state, metrics["epoch"])

    def pause_after(self, state: RunState, epoch: int) -> None:
        if state.stop_reason is None and self.stop_at_epoch <= epoch < state.epochs:
            state.stop_reason = PAUSED


class LeaseKeeper(Callback):
    """From batch ends: renews the lease, sees a cancel, a preemption or a worker shutdown (the trainer owns
    the run time)."""

    def __init__(self, fence: Fence, draining: Callable[[], bool], setup_done: threading.Event | None = None):
        self.fence = fence
        self.setup_done = setup_done  # ends Fence.keep_alive's renewals once the loop renews itself
        self.draining = draining
        self.heartbeat = fence.ctx.settings.heartbeat_seconds
        self.last_check = self.last_renew = time.monotonic()

    def on_train_begin(self, state: RunState) -> None:
        if self.setup_done is not None:
            self.setup_done.set()
        self.last_check = time.monotonic()
        self.last_renew = 0.0  # renew at the first batch: loading data may have taken a while

    def on_batch_end(self, state: RunState) -> None:
        now = time.monotonic()
        if now - self.last_check < CANCEL_CHECK_SECONDS:
            return  # a clock read is all a batch pays
        self.last_check = now
        if self.draining():
            # The worker is shutting down: checkpoint this batch and hand the job back.
            raise StopTraining("preempted", checkpoint=True)
        if now - self.last_renew >= self.heartbeat:
            self.last_renew = now
            row = self.fence.transaction(self.fence.update, durable=False)
        else:
            row = self.fence.transaction(lambda session: session.execute(
                select(Job.cancel_requested, Job.preempt_reason).where(Job.id == self.fence.job_id)).first())
        if row.cancel_requested:
            raise StopTraining("cancelled")
        if row.preempt_reason:
            # A higher-priority job needs the slot: checkpoint this batch and hand the job back, as on shutdown.
            self.fence.hand_back_reason = f"requeued: {row.preempt_reason}"
            raise StopTraining("preempted", checkpoint=True)
