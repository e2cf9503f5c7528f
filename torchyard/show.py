"""What the CLI shows people: tables of jobs, datasets, workers and checkpoints, a job's summary, the lines
of a run, and the live bar of a followed job. Drawn with ``rich``; plain text (no colour or other escape
codes, no bar) when stdout is not a terminal or NO_COLOR is set, so that pipes, logs and tests read it as
text. Imports no torch: the service commands stay quick.

Every function that says how long ago something was takes ``now``, so tests render a fixed database to
fixed text.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

# The metrics a line or the bar shows, in this order, when the run has them.
SHOWN_METRICS = ("loss", "accuracy", "mae", "r2", "val_loss", "val_accuracy", "val_mae", "val_r2")
VALIDATION_METRICS = ("val_accuracy", "val_r2", "val_mae")
RECENT_EPOCHS = 5  # the ETA is the mean of the last few epochs' seconds, times the epochs left
PLAIN_WIDTH = 10_000  # a pipe gets whole lines: a table is never wrapped or cut to 80 columns


# --- terminal or text -----------------------------------------------------------------------------


def is_plain(stream: TextIO) -> bool:
    """True when ``stream`` gets plain text: not a terminal, or NO_COLOR set (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty()) or bool(os.environ.get("NO_COLOR"))


def plain_text(renderable: RenderableType) -> str:
    """``renderable`` as plain text without trailing spaces: what a pipe and the golden tests see."""
    buffer = io.StringIO()
    Console(file=buffer, width=PLAIN_WIDTH, color_system=None, highlight=False, emoji=False).print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def echo(renderable: RenderableType, stream: TextIO | None = None) -> None:
    """Print ``renderable``: styled on a terminal, plain text otherwise."""
    stream = stream or sys.stdout
    if is_plain(stream):
        stream.write(plain_text(renderable) + "\n")
        stream.flush()
    else:
        Console(file=stream, highlight=False, emoji=False).print(renderable)


def _table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table


def _add_row(table: Table, *cells: str | Text) -> None:
    # Text, never markup: a job named "[red]x" shows as typed.
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))


# --- small parts ----------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``1:02:03``, or ``2:03`` under an hour."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def parse_time(value: str | None) -> dt.datetime | None:
    """An API timestamp (ISO 8601, UTC) as an aware datetime; None stays None."""
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def age(value: str | None, now: dt.datetime) -> str:
    """How long before ``now``: ``12s ago``, ``3m ago``, ``5h ago``, ``2d ago``; '-' for none."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def when(value: str | None, now: dt.datetime) -> str:
    """``2026-12-07 01:02:03 UTC (3m ago)``; '-' for none."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    return f"{moment.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({age(value, now)})"


def best_text(best: dict | None) -> str:
    """``val_accuracy 0.93``; '-' before the first epoch."""
    return "-" if not best else f"{best['metric']} {best['value']:.4g}"


def progress_text(job: dict) -> str:
    return f"{job['progress']['epoch']}/{job['progress']['epochs']}"


def size_text(size: int) -> str:
    """``812 B``, ``14.2 kB``, ``3.1 MB`` (powers of 1000, as disks are sold)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# --- jobs -----------------------------------------------------------------------------------------


def jobs_table(jobs: list[dict], now: dt.datetime) -> RenderableType:
    """The jobs, one a row: id, name, status, progress, best metric, age; their owners when they are of more than
    one user (an admin's list), tags and experiment when any job has them. ``no jobs`` when there are none."""
    if not jobs:
        return "no jobs"
    owners = len({job["owner"] for job in jobs}) > 1
    tags = any(job["tags"] for job in jobs)
    experiment = any(job["experiment"] for job in jobs)
    headers = ["ID", *(["OWNER"] if owners else []), "NAME", "STATUS", "PROGRESS", "BEST", "AGE"]
    table = _table(*headers, *(["TAGS"] if tags else []), *(["EXPERIMENT"] if experiment else []))
    for job in jobs:
        row = [job["id"], *([job["owner"]] if owners else []), job["name"], _status(job), progress_text(job),
               best_text(job["best"]), age(job["created_at"], now)]
        row += [",".join(job["tags"]) or "-"] if tags else []
        row += [job["experiment"] or "-"] if experiment else []
        _add_row(table, *row)
    return table


STATUS_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "dim"}


def _status(job: dict) -> Text:
    status = job["status"]
    if status == "running" and job.get("cancel_requested"):
        status = "cancelling"
    return Text(status, style=STATUS_STYLES.get(job["status"], ""))


def job_summary(job: dict, now: dt.datetime) -> RenderableType:
    """One job for a person: status, progress, best metric, device and worker, why it waits or failed,
    and its times."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    status = _status(job)
    if job["attempts"] > 1 or job["status"] == "running":
        status.append(f" (attempt {job['attempts']} of {job['max_attempts']})")
    rows = [("job", f"{job['id']}  {job['name']}"), ("status", status),
            ("progress", f"{progress_text(job)} epochs")]
    if job["best"]:
        rows.append(("best", f"{best_text(job['best'])} at epoch {job['best']['epoch']}"))
    if job.get("device") or job.get("worker_id"):
        rows.append(("device", f"{job.get('device') or '-'} on {job.get('worker_id') or '-'}"))
    rows += [(label, job[field]) for label, field in
             (("error", "error"), ("waiting", "pending_reason"), ("stopped", "stop_reason")) if job.get(field)]
    if job["experiment"] or job["tags"]:
        rows.append(("labels", ", ".join([*([f"experiment {job['experiment']}"] if job["experiment"] else []),
                                          *([f"tags {','.join(job['tags'])}"] if job["tags"] else [])])))
    rows += [(label, when(job[field], now)) for label, field in
             (("created", "created_at"), ("started", "started_at"), ("finished", "finished_at")) if job[field]]
    for label, value in rows:
        _add_row(grid, label, value)
    return grid


def ending(status: str, epochs: int, seconds: float | None, stop_reason: str | None = None,
           error: str | None = None, best: dict | None = None) -> str:
    """How a run ended, in one line: the last line of ``torchyard train`` and of a followed job."""
    if status == "failed":
        return f"failed after {epochs} epochs: {error}"
    if status != "succeeded":  # the engine's "stopped", the service's "cancelled"
        return f"{status} ({stop_reason}) after {epochs} epochs" if stop_reason else f"{status} after {epochs} epochs"
    took = f" in {format_duration(seconds)}" if seconds is not None else ""
    shown = f"; best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}" if best else ""
    return f"succeeded ({stop_reason}) after {epochs} epochs{took}{shown}"


def job_ending(job: dict) -> str:
    """``ending`` of a finished job of the service."""
    started, finished = parse_time(job["started_at"]), parse_time(job["finished_at"])
    seconds = (finished - started).total_seconds() if started and finished else None
    return ending(job["status"], job["progress"]["epoch"], seconds, job["stop_reason"], job["error"], job["best"])


# --- a run's epochs -------------------------------------------------------------------------------


def epoch_line(metrics: dict[str, Any], epochs: int, eta_seconds: float) -> str:
    """``epoch  3/10  loss 0.4121  val_loss 0.3982  val_accuracy 0.8833  0.21s  ETA 0:02``."""
    width = len(str(epochs))
    shown = [f"{name} {metrics[name]:.4f}" for name in SHOWN_METRICS if name in metrics]
    return (f"epoch {metrics['epoch']:>{width}}/{epochs}  " + "  ".join(shown)
            + f"  {metrics.get('epoch_seconds', 0.0):.2f}s  ETA {format_duration(eta_seconds)}")


class Eta:
    """Seconds left: the mean of the last RECENT_EPOCHS epochs' seconds times the epochs left."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def after(self, metrics: dict[str, Any], epochs: int) -> float:
        self.seconds.append(float(metrics.get("epoch_seconds", 0.0)))
        recent = self.seconds[-RECENT_EPOCHS:]
        return sum(recent) / len(recent) * max(0, epochs - metrics["epoch"])


class EpochDisplay:
    """A followed run's epochs: a live bar (epoch/total, loss, the validation metric, ETA) on a terminal,
    a line an epoch (as ``torchyard train`` prints) elsewhere. Use as a context manager."""

    def __init__(self, epochs: int, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.epochs = epochs
        self.eta = Eta()
        self.bar: Progress | None = None
        if not is_plain(self.stream):
            self.bar = Progress(TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"), BarColumn(),
                                TextColumn("{task.fields[metrics]}"), TextColumn("ETA {task.fields[eta]}"),
                                console=Console(file=self.stream, highlight=False), transient=False)
            self.task = self.bar.add_task("train", total=epochs, metrics="", eta="-")

    def __enter__(self) -> EpochDisplay:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def epoch(self, metrics: dict[str, Any]) -> None:
        eta = self.eta.after(metrics, self.epochs)
        if self.bar is None:
            self.stream.write(epoch_line(metrics, self.epochs, eta) + "\n")
            self.stream.flush()
            return
        shown = [name for name in ("loss", "val_loss") if name in metrics]
        shown += [name for name in VALIDATION_METRICS if name in metrics][:1]
        self.bar.update(self.task, completed=metrics["epoch"], eta=format_duration(eta),
                        metrics="  ".join(f"{name} {metrics[name]:.4f}" for name in shown))


# --- datasets, workers, checkpoints ---------------------------------------------------------------


def datasets_table(datasets: list[dict], now: dt.datetime) -> RenderableType:
    """The datasets, one a row: id, name, format, rows, features, target, size, age."""
    if not datasets:
        return "no datasets"
    table = _table("ID", "NAME", "FORMAT", "ROWS", "FEATURES", "TARGET", "SIZE", "AGE")
    for d in datasets:
        _add_row(table, d["id"], d["name"], d["format"], str(d["n_rows"]), str(d["n_features"]), d["target"] or "-",
                      size_text(d["size"]), age(d["created_at"], now))
    return table


def workers_table(answer: dict, now: dt.datetime) -> RenderableType:
    """Live workers: each queue's capacity, and (for admins) each worker's host, devices and jobs."""
    if not answer["live_workers"]:
        return "no live workers"
    table = _table("QUEUE", "WORKERS", "SLOTS", "FREE", "DEVICES")
    for q in answer["queues"]:
        _add_row(table, q["queue"], str(q["workers"]), str(q["slots"]), str(q["free_slots"]),
                      ",".join(q["devices"]) or "-")
    if answer.get("workers") is None:
        return table
    workers = _table("WORKER", "HOST", "QUEUES", "SLOTS", "FREE", "JOBS", "HEARTBEAT")
    for w in answer["workers"]:
        _add_row(workers, w["id"], w["hostname"], ",".join(w["queues"]), str(w["slots"]), str(w["free_slots"]),
                        ",".join(w["job_ids"]) or "-", age(w["last_heartbeat_at"], now))
    return _stacked([table, "", workers])


def checkpoints_table(job_id: str, checkpoints: list[dict], now: dt.datetime) -> RenderableType:
    """A job's checkpoints, one a row: epoch, file, size, age, and the path to download it from."""
    if not checkpoints:
        return Text(f"no checkpoints of {job_id}")
    table = _table("EPOCH", "NAME", "SIZE", "AGE", "DOWNLOAD")
    for c in checkpoints:
        _add_row(table, "-" if c["epoch"] is None else str(c["epoch"]), c["name"], size_text(c["size"]),
                      age(c["created_at"], now), c["download"])
    return table


def _stacked(parts: Iterable[RenderableType]) -> RenderableType:
    from rich.console import Group

    return Group(*parts)


# --- sweeps ---------------------------------------------------------------------------------------

# A trial's state (the API's): its job's status, with "paused" (waiting at a rung for its sweep to decide)
# and "pruned" (stopped for good at a rung, its weights kept) told apart.
TRIAL_STATES = ("queued", "running", "paused", "succeeded", "pruned", "failed", "cancelled")
STATE_STYLES = {**STATUS_STYLES, "paused": "magenta", "pruned": "dim"}


def param_text(value: Any) -> str:
    """A parameter's value as a cell shows it: ``0.01234`` (four significant digits), ``64``, ``Adam``, ``null``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def params_text(params: dict[str, Any]) -> str:
    """``optimizer.lr=0.01, training.batch_size=32``."""
    return ", ".join(f"{path}={param_text(value)}" for path, value in params.items()) or "-"


def value_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def ranked_trials(trials: list[dict], mode: str) -> list[dict]:
    """The trials best first by their metric's value at their last epoch (``mode`` "max" or "min"); trials
    with no value yet last; ties by trial number."""
    sign = -1 if mode == "max" else 1
    return sorted(trials, key=lambda t: (t["value"] is None, 0 if t["value"] is None else sign * t["value"],
                                         t["number"]))


def counts_text(counts: dict[str, int]) -> str:
    """``2 running, 1 paused, 3 pruned``: the states that have trials, in TRIAL_STATES' order."""
    return ", ".join(f"{counts[state]} {state}" for state in TRIAL_STATES if counts.get(state)) or "none yet"


def sweep_best_text(sweep: dict) -> str:
    best = sweep.get("best")
    return "-" if not best else f"{best['metric']} {best['value']:.4g}"


def _finished_trials(sweep: dict) -> int:
    return sum(sweep["counts"].get(state, 0) for state in ("succeeded", "pruned", "failed", "cancelled"))


def sweeps_table(sweeps: list[dict], now: dt.datetime) -> RenderableType:
    """The sweeps, one a row: id, name, status, trials ended of all, best metric, age."""
    if not sweeps:
        return "no sweeps"
    table = _table("ID", "NAME", "STATUS", "TRIALS", "BEST", "AGE")
    for sweep in sweeps:
        _add_row(table, sweep["id"], sweep["name"], Text(sweep["status"], style=STATUS_STYLES.get(sweep["status"], "")),
                 f"{_finished_trials(sweep)}/{sweep['trials']}", sweep_best_text(sweep), age(sweep["created_at"], now))
    return table


def sweep_summary(sweep: dict, now: dt.datetime) -> RenderableType:
    """One sweep for a person: status, method, metric, scheduler, its trials by state, the best trial and its
    parameters, the error of a failed one, its times."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    created = sweep["created"]
    rows: list[tuple[str, str | Text]] = [
        ("sweep", f"{sweep['id']}  {sweep['name']}"),
        ("status", Text(sweep["status"], style=STATUS_STYLES.get(sweep["status"], ""))),
        ("method", f"{sweep['method']}, {sweep['trials']} trials ({created} created), parallelism "
                   f"{sweep['parallelism']}"),
        ("metric", f"{sweep['metric']} ({sweep['mode']})")]
    scheduler = sweep["request"]["scheduler"]
    if scheduler:
        rows.append(("scheduler", f"{scheduler['type']}: rungs at epochs {', '.join(map(str, sweep['rungs']))}, "
                                  f"reduction factor {scheduler['reduction_factor']}"))
    rows.append(("trials", counts_text(sweep["counts"])))
    best = sweep.get("best")
    if best:
        rows += [("best", f"{sweep_best_text(sweep)} by job {best['job_id']}"), ("params", params_text(best["params"]))]
    if sweep.get("error"):
        rows.append(("error", sweep["error"]))
    rows += [(label, when(sweep[field], now)) for label, field in
             (("created", "created_at"), ("finished", "finished_at")) if sweep.get(field)]
    for label, value in rows:
        _add_row(grid, label, value)
    return grid


def trials_table(trials: list[dict], metric: str, mode: str) -> RenderableType:
    """The trials best first (``ranked_trials``), one a row: number, job, state, epochs, rung, the metric at
    its last epoch, then a column per parameter."""
    if not trials:
        return "no trials yet"
    paths = list(dict.fromkeys(path for trial in trials for path in trial["params"]))
    table = _table("#", "JOB", "STATE", "EPOCH", "RUNG", metric.upper(), *paths)
    for trial in ranked_trials(trials, mode):
        state = trial["state"]
        _add_row(table, str(trial["number"]), trial["job_id"], Text(state, style=STATE_STYLES.get(state, "")),
                 f"{trial['epoch']}/{trial['epochs']}", "-" if trial["rung"] is None else str(trial["rung"]),
                 value_text(trial["value"]),
                 *(param_text(trial["params"][path]) if path in trial["params"] else "-" for path in paths))
    return table


def trial_line(trial: dict, metric: str, state: str | None = None) -> str:
    """A followed sweep's line for a trial whose state changed (``state``, when given, said in its place):
    ``trial 3  paused     epoch  2/18  val_accuracy 0.9100  optimizer.lr=0.01``."""
    shown = f"  {metric} {trial['value']:.4f}" if trial["value"] is not None else ""
    return (f"trial {trial['number']}  {state or trial['state']:<9}  epoch "
            f"{trial['epoch']:>{len(str(trial['epochs']))}}/"
            f"{trial['epochs']}{shown}  {params_text(trial['params'])}")


def sweep_progress_line(sweep: dict) -> str:
    """A followed sweep's counts and best so far: ``trials 4/9 created: 2 running, 1 paused, 1 pruned; best
    val_accuracy 0.9333``."""
    created = sweep["created"]
    best = f"; best {sweep_best_text(sweep)}" if sweep.get("best") else ""
    return f"trials {created}/{sweep['trials']} created: {counts_text(sweep['counts'])}{best}"


def sweep_ending(sweep: dict) -> str:
    """How a sweep ended, in one line: ``sweep succeeded: 1 succeeded, 2 pruned; best val_accuracy 0.9 by job
    job_… (optimizer.lr=0.01)``; a failed one's error."""
    line = f"sweep {sweep['status']}: {counts_text(sweep['counts'])}"
    if sweep.get("error"):
        line += f"; {sweep['error']}"
    best = sweep.get("best")
    if best:
        line += f"; best {sweep_best_text(sweep)} by job {best['job_id']} ({params_text(best['params'])})"
    return line
