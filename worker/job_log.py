"""A job's own log: the lines of its life (start, resume, hand-back, end, error) and what its run emits
(Python warnings, log records of WARNING and above, a crash's traceback), stored as ``job_logs`` rows.

Lines wait in memory and are written with the attempt's next fenced transaction (``Fence.update``: each
lease renewal and epoch end) or with the one that ends the attempt (``close``): a log costs no transaction
of its own, and an attempt that lost its job writes none. ``seq`` numbers a job's lines across its
attempts; an attempt starts after the last line of the one before (which can write no more: it lost the
fence). A line is cut to ``max_log_line_length`` characters; once the log holds ``max_log_lines`` lines,
the run's output is dropped, which one line says, while the lines of the job's life are always kept.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.db import insert_new
from models.settings import Settings
from models.tables import Job, LogLine, utcnow
from models.text import visible

# Where a session keeps the lines it is writing until its transaction ends (Fence.transaction calls back).
WRITING = "torchyard.job_log"
REPLACEMENT = "\ufffd"  # what a control or format character of a line becomes: stored text's rule, kept visible


def level_name(levelno: int) -> str:
    """A logging level as one of the log's three: INFO, WARNING or ERROR."""
    return "ERROR" if levelno >= logging.ERROR else "WARNING" if levelno >= logging.WARNING else "INFO"


class JobLog:
    """The log lines of one attempt of one job, waiting to be written. Thread-safe: the run, its lease
    renewals and its log capture add and write from different threads."""

    def __init__(self, job_id: str, attempt: int, last_seq: int, settings: Settings):
        self.job_id = job_id
        self.attempt = attempt
        self.max_lines = settings.max_log_lines
        self.max_length = settings.max_log_line_length
        self.dropped = 0
        self._seq = last_seq
        self._pending: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None  # the attempt's closing line, once ``close`` made it
        self._lock = threading.Lock()

    # --- adding lines ---------------------------------------------------------------------------

    def event(self, level: str, text: str) -> None:
        """A line of the job's life (start, resume, hand-back, early stop, end, error): always kept."""
        with self._lock:
            for line in _lines(text):
                self._pending.append(self._row(level, line))

    def output(self, level: str, text: str) -> None:
        """A line the run emitted (a warning, a log record, a traceback line): kept while the log holds
        fewer than ``max_lines`` lines; the first one dropped adds a line that says so."""
        with self._lock:
            for line in _lines(text):
                if self._seq < self.max_lines:
                    self._pending.append(self._row(level, line))
                    continue
                if not self.dropped:
                    self._pending.append(self._row(
                        "WARNING", f"the log holds {self.max_lines} lines (TORCHYARD_MAX_LOG_LINES): the rest of "
                                   f"attempt {self.attempt}'s warnings, log records and traceback is dropped"))
                self.dropped += 1

    def failure(self, exc: BaseException) -> None:
        """The traceback of the exception that ended the run, a line a line (its closing line names it)."""
        self.output("ERROR", "".join(traceback.format_exception(exc)).rstrip())

    def _row(self, level: str, text: str) -> dict[str, Any]:
        self._seq += 1
        return {"job_id": self.job_id, "seq": self._seq, "attempt": self.attempt, "created_at": utcnow(),
                "level": level, "text": self._stored(text)}

    def _stored(self, text: str) -> str:
        """A line as stored: cut to ``max_length`` characters, a control or format character shown as U+FFFD."""
        if len(text) > self.max_length:
            text = f"{text[:self.max_length]}… ({len(text)} characters)"
        return visible(text, REPLACEMENT)

    # --- writing them ---------------------------------------------------------------------------

    def write(self, session: Session) -> None:
        """Insert the waiting lines in ``session``'s transaction; ``written`` or ``unwritten`` (Fence.transaction)
        settles them once it ends. Another thread's transaction meanwhile takes only lines added after.

        Call it after the transaction's fenced UPDATE of the job's row (claim, renew, finish, hand back): that
        row's lock makes the transactions that write a job's lines take turns, so lines commit in seq order
        and a follower that asks for the lines after the last seq it saw misses none."""
        with self._lock:
            rows, self._pending = self._pending, []
        if rows:
            session.info.setdefault(WRITING, []).extend(rows)
            # A retried commit that did land the first time finds its rows there: nothing twice, no error.
            insert_new(session, LogLine, rows)

    def close(self, session: Session, level: str, text: str) -> None:
        """Write the waiting lines and then ``text``, the attempt's last line, in the transaction that ends the
        attempt. A retried transaction calls it again: the same line (same seq) then says the latest ``text``."""
        with self._lock:
            if self.dropped:
                text = f"{text} ({self.dropped} log lines dropped)"
            if self._last is None:  # kept past max_lines too: it says how the attempt ended
                self._last = self._row(level, text)
                self._pending.append(self._last)
            else:
                self._last.update(level=level, text=self._stored(text))
        self.write(session)

    @staticmethod
    def written(session: Session) -> None:
        """``session`` committed: its lines are stored."""
        session.info.pop(WRITING, None)

    def unwritten(self, session: Session) -> None:
        """``session`` rolled back: its lines wait again, for the next transaction."""
        rows = session.info.pop(WRITING, [])
        if rows:
            with self._lock:
                self._pending = sorted(rows + self._pending, key=lambda row: row["seq"])

    # --- capturing the run's own output ---------------------------------------------------------

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """While the block runs, this process's Python warnings and log records of WARNING and above are lines
        of the job (one job runs in a worker's pool process at a time). Warnings show as Python's filters say,
        once per place in the code for each job (catch_warnings starts each job afresh)."""
        handler = _Capture(self)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = self._warning  # catch_warnings puts the process's own back afterwards
                yield
        finally:
            root.removeHandler(handler)

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.output("WARNING", f"{category.__name__}: {message} ({filename}:{lineno})")


class _Capture(logging.Handler):
    def __init__(self, log: JobLog):
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({traceback.format_exception_only(record.exc_info[1])[-1].strip()})"
            self.log.output(level_name(record.levelno), f"{record.name}: {text}")
        except Exception:  # noqa: BLE001 - logging's own rule: a handler that fails must not fail the caller
            self.handleError(record)


def _lines(text: str) -> list[str]:
    return text.expandtabs(4).splitlines() or [""]


def start_log(session: Session, job: Job, settings: Settings) -> JobLog:
    """The log of the attempt ``job`` was just claimed for (in the claim's transaction), its first line
    written there: the attempt, the worker and the device."""
    # A first attempt finds no lines; a later one continues after the last line of those before it.
    log = JobLog(job.id, job.attempts, 0 if job.attempts == 1 else _last_seq(session, job.id), settings)
    log.event("INFO", f"attempt {job.attempts} of {job.max_attempts} started on worker {job.worker_id}; "
                      f"device {job.device or 'none'}, {threads_said()}")
    log.write(session)
    return log


def threads_said() -> str:
    """This process's torch intra-op threads, as the log says them (a worker's slot's share: worker.cpus)."""
    import torch  # here, not at the top: `torchyard maintenance` imports this module and never torch

    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'' if threads == 1 else 's'}"


def log_loss(session: Session, settings: Settings, job_id: str, attempt: int, what: str, status: str) -> None:
    """Say in the job's log that its attempt was lost (``what`` happened) and the job is ``status`` now, in the
    transaction whose ``lifecycle.reap`` or ``lifecycle.lose`` ended the attempt (its UPDATE holds the row)."""
    log = JobLog(job_id, attempt, _last_seq(session, job_id), settings)
    log.event("WARNING", f"attempt {attempt} lost: {what}; the job is {status}")
    log.write(session)


def _last_seq(session: Session, job_id: str) -> int:
    return session.scalar(select(func.coalesce(func.max(LogLine.seq), 0)).where(LogLine.job_id == job_id))
