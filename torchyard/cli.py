"""The ``torchyard`` command: train locally, run the service, and talk to it."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from models.paging import MAX_LIMIT

LIMIT = click.IntRange(1, MAX_LIMIT)  # the API's bounds on a page


def _read_spec_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path} is not valid JSON: {exc}") from None


def _local_data_path(spec, spec_file: Path) -> Path | None:
    """A relative data.path is relative to the spec file, as paths in compose files are."""
    if spec.data.source != "file":
        return None
    return spec_file.parent / spec.data.path  # an absolute path stays as it is


@contextlib.contextmanager
def _spec_refusals():
    """A spec the engine refuses ends the command with its problems, one a line, and exit code 2."""
    from models.spec import SpecError

    try:
        yield
    except SpecError as error:
        click.echo("invalid spec:", err=True)
        for problem in error.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="torchyard")
def main() -> None:
    """torchyard: training-as-a-service for PyTorch."""
    from models.settings import get_settings

    try:
        get_settings()
    except ValueError as error:  # an unknown or malformed TORCHYARD_* variable
        raise click.ClickException(f"bad configuration: {error}") from None


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for weights.safetensors, model.json, metrics.jsonl and checkpoints/.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--force", is_flag=True, help="Train afresh into a non-empty --out, replacing its run.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None,
              help="Override resources.device of the spec.")
def train(spec_file: Path, out_dir: Path, resume: bool, force: bool, device: str | None) -> None:
    """Train SPEC_FILE on this machine."""
    from models.settings import get_settings
    from models.validation import parse_spec

    if resume and force:
        raise click.UsageError("--resume continues the run in --out and --force replaces it: give one of them")
    if not (resume or force) and out_dir.is_dir() and any(out_dir.iterdir()):
        raise click.UsageError(f"{out_dir} is not empty: --resume continues the run in it, --force trains "
                               "afresh over it, or name another --out")
    # Read before the run is prepared: whether the folder held files of its own, besides a run's.
    foreign = _not_a_run_s(out_dir) if resume else []
    limits = get_settings().limits
    with _spec_refusals():
        spec = parse_spec(_read_spec_file(spec_file), limits)
    # Only now torch and scikit-learn (seconds to import): a refused command or spec is answered at once.
    from torchyard.progress import ProgressPrinter, network_table, summary_line
    from worker.engine import finish, prepare_run

    printer = ProgressPrinter()
    with _spec_refusals():
        prepared = prepare_run(spec, out_dir, resume=resume, callbacks=[printer],
                               data_path=_local_data_path(spec, spec_file), device=device, limits=limits)
    if resume and prepared.resumed_from is None:
        if foreign:  # training there would mix a new run into files of another kind: said, not done
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise click.UsageError(f"nothing to resume in {out_dir}: it holds no checkpoint, and files that are "
                                   f"not a torchyard run's ({shown}); --force trains afresh there (keeping them), "
                                   "or name another --out")
        click.echo(f"nothing to resume in {out_dir} (no checkpoint): starting fresh")
    data = prepared.data
    click.echo(f"{spec.name}: task {spec.task}, {data.n_train} training / {data.n_val} validation samples, "
               f"device {prepared.trainer.device}")
    click.echo(network_table(prepared.plan, data.report.input_shape))
    if prepared.resumed_from is not None:
        click.echo(f"resuming after epoch {prepared.resumed_from}")
    started = time.monotonic()
    try:
        result = finish(prepared, spec, out_dir)
    finally:
        printer.close()
    click.echo(summary_line(result, time.monotonic() - started))
    if result.compile_seconds is not None:
        click.echo(f"of which compiling (training.compile): {result.compile_seconds:.1f}s")
    if result.status != "succeeded":
        sys.exit(1)
    click.echo(f"outputs in {out_dir}")


def _not_a_run_s(out_dir: Path) -> list[str]:
    """What in ``out_dir`` isn't a torchyard run's: anything but a model folder's files (weights, card,
    metrics) and folders (checkpoints/; an empty one is nothing either way)."""
    from torchyard.bundle import CARD, METRICS, WEIGHTS

    if not out_dir.is_dir():
        return []
    return sorted(path.name for path in out_dir.iterdir()
                  if path.name not in (WEIGHTS, CARD, METRICS) and not (path.is_dir() and not any(path.iterdir())))


# --- running the service ---------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Address to listen on (TORCHYARD_HOST, default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (TORCHYARD_PORT, default 8000).")
@click.option("--access-log", is_flag=True, help="Log every request (off by default: serve keeps its output quiet).")
def serve(host: str | None, port: int | None, access_log: bool) -> None:
    """The whole service on this machine: migrations, the API (gunicorn) and one worker."""
    from torchyard.serve import serve as run

    run(host, port, access_log)


@main.command()
@click.option("--bind", default=None, help="host:port for gunicorn (default TORCHYARD_HOST:TORCHYARD_PORT).")
@click.option("--workers", type=int, default=None, help="gunicorn processes (TORCHYARD_API_WORKERS).")
def api(bind: str | None, workers: int | None) -> None:
    """The API alone under gunicorn, for production (run `torchyard db upgrade` first)."""
    import os

    from api.gunicorn_hooks import VARIABLE, metrics_directory
    from api.gunicorn_worker import gunicorn_argv
    from models.settings import get_settings

    settings = get_settings()
    bind = bind or f"{settings.host}:{settings.port}"
    try:
        argv = gunicorn_argv(settings, bind, workers or settings.api_workers)
    except ValueError as error:  # settings that can't serve (streams that would take every thread)
        raise click.UsageError(str(error)) from None
    # Every gunicorn process writes its request metrics there, and /metrics sums them (api/metrics.py).
    os.environ[VARIABLE] = metrics_directory()
    os.execvp(sys.executable, [sys.executable, "-m", *argv])


@main.command()
@click.option("--queues", default=None,
              help="Comma-separated queues to serve: cpu, mps (on a Mac: jobs asking for Apple's MPS), gpu, "
                   "gpu.K for K-GPU jobs (TORCHYARD_WORKER_QUEUES).")
@click.option("--concurrency", type=int, default=None,
              help="Jobs a CPU worker runs at once (TORCHYARD_WORKER_CONCURRENCY); a GPU worker runs one a "
                   "slot of TORCHYARD_WORKER_GPUS_PER_SLOT GPUs.")
@click.option("--loglevel", default="INFO")
def worker(queues: str | None, concurrency: int | None, loglevel: str) -> None:
    """A Celery worker that trains jobs from the queues."""
    from models.settings import get_settings
    from worker.processes import run_worker

    settings = get_settings()
    names = [q.strip() for q in (queues or settings.worker_queues).split(",") if q.strip()]
    try:
        run_worker(names, concurrency or settings.worker_concurrency, loglevel)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


@main.command()
@click.option("--loglevel", default="INFO")
def maintenance(loglevel: str) -> None:
    """Requeue the jobs of dead workers and say why queued jobs wait, even when no worker is alive.

    Runs until SIGTERM or Ctrl-C; needs no torch; any number may run (`serve` runs its own).
    """
    import logging

    from worker.context import context
    from worker.maintenance import run

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(context())


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database (TORCHYARD_DATABASE_URL) to the newest schema."""
    from migrations.apply import upgrade
    from models.settings import get_settings

    upgrade(get_settings().database_url)
    click.echo("database is at the newest revision")


@contextlib.contextmanager
def _accounts():
    """A database session for the commands that manage users and keys (they need no running API); an
    AccountError becomes a usage error (exit 2)."""
    from models.accounts import AccountError
    from models.db import make_engine, make_sessionmaker
    from models.settings import get_settings

    engine = make_engine(get_settings().database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    except AccountError as error:
        raise click.UsageError(str(error)) from None
    finally:
        engine.dispose()


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns as wide as their widest cell, a header and a rule."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _when(moment) -> str:
    """A stored time as the tables show it: UTC to the minute, '-' for none."""
    import datetime as dt

    if moment is None:
        return "-"
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


@main.group()
def token() -> None:
    """API keys."""


@token.command("create")
@click.argument("name")
@click.option("--user", default=None, help="The user the key belongs to (default: NAME; made if missing).")
@click.option("--expires", default=None, help="When the key stops working: 30d (days from now), 2027-01-31 "
                                              "(that day's start, UTC) or an ISO 8601 time. Default: never.")
def token_create(name: str, user: str | None, expires: str | None) -> None:
    """Create an API key and print it (only its hash is stored: keep it)."""
    from models import accounts
    from models.tables import utcnow

    with _accounts() as session:
        expires_at = accounts.expiry(expires, utcnow()) if expires is not None else None
        click.echo(accounts.create_api_key(session, user or name, name, expires_at))


@token.command("list")
@click.option("--user", default=None, help="Only this user's keys.")
def token_list(user: str | None) -> None:
    """The API keys: name, user, prefix, when made, last used, expires, revoked (never a key itself)."""
    from models import accounts

    with _accounts() as session:
        rows = [[row.key.name, row.user_name, row.key.prefix or "-", _when(row.key.created_at),
                 _when(row.key.last_used_at), _when(row.key.expires_at), _when(row.key.revoked_at)]
                for row in accounts.keys(session, user)]
    click.echo(_table(["name", "user", "prefix", "created", "last used", "expires", "revoked"], rows))


@token.command("revoke")
@click.argument("name")
@click.option("--user", default=None, help="Whose key (needed when several users have a key called NAME).")
def token_revoke(name: str, user: str | None) -> None:
    """Revoke API keys called NAME: the API refuses them from the next request on."""
    from models import accounts

    with _accounts() as session:
        for row in accounts.revoke_key(session, name, user):
            click.echo(f"revoked {row.key.name} ({row.key.prefix or 'no prefix'}…) of {row.user_name}")


@main.group("user")
def user_group() -> None:
    """Users: roles, fair shares, quotas."""


@user_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin sees every user's jobs, the workers and the audit log.")
@click.option("--share", type=float, default=1.0, show_default=True, help="Weight in fair-share dispatch.")
def user_create(name: str, admin: bool, share: float) -> None:
    """Create a user (then `torchyard token create KEY --user NAME` gives them a key)."""
    from models import accounts

    with _accounts() as session:
        made = accounts.create_user(session, name, role="admin" if admin else "user", share=share)
        click.echo(f"created {made.role} {made.name}")


@user_group.command("list")
def user_list() -> None:
    """The users: name, role, share, quota overrides, working keys, when made."""
    from models import accounts

    with _accounts() as session:
        rows = [[row.user.name, row.user.role, f"{row.user.share:g}", _overrides(row.user.quotas), str(row.keys),
                 _when(row.user.created_at)] for row in accounts.users(session)]
    click.echo(_table(["name", "role", "share", "quotas", "keys", "created"], rows))


def _overrides(quotas: dict | None) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted((quotas or {}).items())) or "-"


@user_group.command("set-quota")
@click.argument("name")
@click.argument("quota")
@click.argument("value")
def user_set_quota(name: str, quota: str, value: str) -> None:
    """Override one of the user's quotas (VALUE a whole number), or `default` to use the deployment's."""
    from models import accounts

    with _accounts() as session:
        made = accounts.set_quota(session, name, quota, accounts.quota_value(value))
        click.echo(f"{made.name}: {_overrides(made.quotas)}")


@user_group.command("set-share")
@click.argument("name")
@click.argument("share", type=float)
def user_set_share(name: str, share: float) -> None:
    """Set the user's weight in fair-share dispatch (above 0; everyone starts at 1)."""
    from models import accounts

    with _accounts() as session:
        click.echo(f"{name}: share {accounts.set_share(session, name, share).share:g}")


@user_group.command("set-role")
@click.argument("name")
@click.argument("role")
def user_set_role(name: str, role: str) -> None:
    """Make the user a plain `user` or an `admin` (models.roles says what each sees)."""
    from models import accounts

    with _accounts() as session:
        click.echo(f"{name}: role {accounts.set_role(session, name, role).role}")


# --- talking to a service --------------------------------------------------------------------


def _client():
    from models.settings import get_settings
    from torchyard.client import Client

    settings = get_settings()
    token_value = settings.token
    saved = settings.home / "token"
    if not token_value and saved.is_file():
        token_value = saved.read_text().strip()
    if not token_value:
        raise click.UsageError(f"no API key: set TORCHYARD_TOKEN, or save one in {saved} (`torchyard serve` saves "
                               "one there; `torchyard token create NAME` makes one on the service's machine)")
    return Client(settings.url, token_value)


@contextlib.contextmanager
def _api_errors():
    """An API error or an unreachable API becomes one message on stderr and exit 1: the problem's title,
    detail and field errors, each once, never a traceback."""
    import http.client
    import urllib.error

    from torchyard.client import ApiError, SendCutOff

    try:
        yield
    except (ApiError, SendCutOff) as error:  # SendCutOff: it reached the API, which cut the upload off
        raise click.ClickException(str(error)) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as error:
        from models.settings import get_settings

        reason = getattr(error, "reason", None) or error
        raise click.ClickException(f"can't reach the torchyard API at {get_settings().url} ({reason}); is "
                                   "`torchyard serve` running there? TORCHYARD_URL says where it is") from None
    except OSError as error:  # a local file: the one to upload, or the folder to download into
        raise click.ClickException(str(error)) from None


def _call(function, *args, **kwargs):
    with _api_errors():
        return function(*args, **kwargs)


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2))


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def _follow(client, job: dict) -> dict:
    """The job's epochs as they end, from the metrics stream (a live bar on a terminal, a line an epoch
    elsewhere), then how it ended and, after a success, how to download it; returns the finished job."""
    import shlex

    from torchyard import show

    if job["status"] == "queued":  # the id was said already: by `submit`, or by whoever asked for its status
        click.echo("queued" + (f": {job['pending_reason']}" if job.get("pending_reason") else ""))
    finished = job
    with _api_errors(), show.EpochDisplay(job["progress"]["epochs"]) as display:
        for event, data in client.stream_metrics(job["id"]):
            if event == "metrics":
                display.epoch(data)
            else:
                finished = data
    click.echo(show.job_ending(finished))
    if finished["status"] == "succeeded":
        out = shlex.quote(f"runs/{finished['name']}")
        click.echo(f"download it: torchyard download {finished['id']} --out {out}")
    return finished


def _file_data_uploaded(client, spec, spec_file: Path) -> tuple[object, str | None]:
    """A spec whose data is a local file (data.source "file") pointing at that file as a dataset of the
    service (source "dataset"), and the id of the dataset uploaded for it (None when one of the caller's
    datasets holds the same file already, and is used instead); any other spec as it is, and None."""
    data = spec.get("data") if isinstance(spec, dict) else None
    if not (isinstance(data, dict) and data.get("source") == "file" and isinstance(data.get("path"), str)):
        return spec, None  # not a local file (or a malformed one, which the API names)
    path = spec_file.parent / data["path"]  # relative to the spec file, as `torchyard train` reads it
    if not path.is_file():
        raise click.UsageError(f"data.path: {data['path']} is not a file (read as {path})")
    target = data.get("target") if isinstance(data.get("target"), str) else None
    dataset, uploaded = _call(_same_dataset, client, path, target), None
    if dataset is not None:
        click.echo(f"{data['path']} is dataset {dataset['id']} already (the same SHA-256); submitting with "
                   f"data.dataset_id={dataset['id']}", err=True)
    else:
        dataset = _call(client.upload_dataset, path, target=target)
        uploaded = dataset["id"]
        click.echo(f"uploaded {data['path']} as dataset {dataset['id']}; submitting with "
                   f"data.dataset_id={dataset['id']}", err=True)
    moved = {key: value for key, value in data.items() if key != "path"}
    return {**spec, "data": {**moved, "source": "dataset", "dataset_id": dataset["id"]}}, uploaded


def _same_dataset(client, path: Path, target: str | None) -> dict | None:
    """The caller's dataset that holds this very file (its SHA-256) with the same target column, if any."""
    import hashlib

    from models.tabular import TableError, csv_header, open_csv

    if path.suffix.lower() == ".csv" and target is None:
        try:  # the service's default target: the last column of the header
            with open_csv(path) as handle:
                target = csv_header(handle)[-1]
        except (TableError, UnicodeDecodeError):
            return None  # not a CSV file the service takes: the upload says why
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    cursor = None
    while True:
        page = client.datasets(limit=MAX_LIMIT, cursor=cursor)
        for dataset in page["datasets"]:
            if dataset["sha256"] == digest.hexdigest() and dataset["target"] == target:
                return dataset
        cursor = page["next_cursor"]
        if not cursor:
            return None


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tag", "tags", multiple=True, help="Label the job with this tag, besides the spec's own (repeatable).")
@click.option("--experiment", default=None, help="The job's experiment, in place of the spec's.")
@click.option("--follow", is_flag=True, help="Show progress until the job finishes.")
def submit(spec_file: Path, tags: tuple[str, ...], experiment: str | None, follow: bool) -> None:
    """Submit SPEC_FILE to the service and print the job id.

    A spec whose data is a local file (data.source "file") goes as data.source "dataset": with the id of
    your dataset that holds that file already (the same SHA-256 and target), or else the file is uploaded
    first, and that upload deleted again if the service refuses the spec.
    """
    client = _client()
    spec, uploaded = _file_data_uploaded(client, _read_spec_file(spec_file), spec_file)
    try:
        job = _call(client.submit, _labelled(spec, tags, experiment))
    except click.ClickException:
        if uploaded is not None:
            _forget_upload(client, uploaded)
        raise
    click.echo(job["id"])
    if follow and _follow(client, job)["status"] != "succeeded":
        sys.exit(1)


def _forget_upload(client, dataset_id: str) -> None:
    """Delete the dataset a submit uploaded once the submit failed: it would only count against the quota."""
    try:
        _call(client.delete_dataset, dataset_id)
    except click.ClickException as error:
        click.echo(f"the submit failed, and so did deleting dataset {dataset_id}, uploaded for it ({error.message}): "
                   f"`torchyard datasets delete {dataset_id}` deletes it", err=True)
    else:
        click.echo(f"deleted dataset {dataset_id} again, uploaded for this submit, which failed", err=True)


def _labelled(spec, tags: tuple[str, ...], experiment: str | None):
    """The spec with ``tags`` after its own (each once) and ``experiment`` in place of its own. The API checks
    them, so a spec that isn't an object, or whose tags aren't a list, goes as it is, to be refused there."""
    if not isinstance(spec, dict):
        return spec
    labelled = dict(spec)
    own = spec.get("tags", [])
    if tags and isinstance(own, list):
        labelled["tags"] = own + [tag for tag in dict.fromkeys(tags) if tag not in own]
    if experiment is not None:
        labelled["experiment"] = experiment
    return labelled


@main.command()
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Show progress until the job finishes.")
@click.option("--json", "as_json", is_flag=True, help="The job as the API's JSON document.")
def status(job_id: str, follow: bool, as_json: bool) -> None:
    """A job's state: status, progress, best metric, device, why it waits or failed, its times."""
    from torchyard import show

    client = _client()
    job = _call(client.job, job_id)
    if as_json:
        _echo_json(job)
    elif follow:
        if _follow(client, job)["status"] != "succeeded":
            sys.exit(1)
    else:
        show.echo(show.job_summary(job, _now()))


@main.command("list")
@click.option("--status", "status_filter", default=None, help="Only jobs in this status.")
@click.option("--tag", "tags", multiple=True, help="Only jobs carrying this tag (repeat it: jobs carrying each).")
@click.option("--experiment", default=None, help="Only the jobs of this experiment.")
@click.option("--limit", type=LIMIT, default=20, show_default=True, help="How many jobs, newest first.")
def list_jobs(status_filter: str | None, tags: tuple[str, ...], experiment: str | None, limit: int) -> None:
    """Your newest jobs (an admin's: everyone's, with their owners): id, name, status, progress, best metric, age;
    tags and experiment when any has them."""
    from torchyard import show

    jobs = _call(_client().jobs, status=status_filter, limit=limit, tags=tags, experiment=experiment)["jobs"]
    show.echo(show.jobs_table(jobs, _now()))


@main.command()
@click.argument("job_id")
def metrics(job_id: str) -> None:
    """A job's per-epoch metrics as JSON lines."""
    for row in _call(_client().metrics, job_id):
        click.echo(json.dumps(row))


@main.command()
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Go on showing new lines until the job finishes.")
def logs(job_id: str, follow: bool) -> None:
    """A job's own log: its start (worker, device), warnings, resumes and how it ended."""
    client = _client()
    if follow:
        _call(_echo_log_lines, client.follow_logs(job_id))
    else:
        _echo_log_lines(_call(client.logs, job_id)["lines"])


def _echo_log_lines(lines) -> None:
    for line in lines:
        click.echo(f"{line['time']} {line['level']:<7} [attempt {line['attempt']}] {line['text']}")


@main.command()
@click.argument("job_id")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def download(job_id: str, out_dir: Path) -> None:
    """Download weights, model card and metrics into --out (load with torchyard.load_model)."""
    _call(_client().download_bundle, job_id, out_dir)
    click.echo(f"saved to {out_dir}")


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued job (at once) or a running one (it stops at its next batch). Cancelling a job that
    is cancelled or stopping already is no error."""
    from torchyard.client import ApiError

    client = _client()
    with _api_errors():
        try:
            job = client.cancel(job_id)
        except ApiError as error:
            if error.status != 409:
                raise
            job = client.job(job_id)  # ended already: cancelled is what was asked; anything else says why not
            if job["status"] != "cancelled":
                raise error from None
            click.echo(f"{job['id']} was cancelled already")
            return
    if job["status"] == "cancelled":
        click.echo(f"{job['id']} cancelled")
    else:
        click.echo(f"{job['id']} cancel requested: it stops at the end of its current batch")


@main.command()
@click.argument("job_id")
def delete(job_id: str) -> None:
    """Delete a finished job: its row, metrics, log, checkpoints and weights."""
    _call(_client().delete, job_id)
    click.echo(f"deleted {job_id}")


@main.command()
@click.argument("job_id")
def checkpoints(job_id: str) -> None:
    """The checkpoints a job keeps: epoch, file, size, age and where to download each."""
    from torchyard import show

    show.echo(show.checkpoints_table(job_id, _call(_client().checkpoints, job_id), _now()))


@main.command()
def workers() -> None:
    """Live workers: each queue's workers, slots and devices (an admin also sees each worker)."""
    from torchyard import show

    show.echo(show.workers_table(_call(_client().workers), _now()))


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", default=None, help="The label column of a CSV file (default: the last one).")
def upload(path: Path, target: str | None) -> None:
    """Upload a CSV or NPZ dataset; use its id as data.dataset_id in a spec."""
    _echo_json(_call(_client().upload_dataset, path, target=target))


@main.group(invoke_without_command=True)
@click.pass_context
def datasets(context: click.Context) -> None:
    """Your uploaded datasets (`torchyard datasets delete ID` deletes one)."""
    if context.invoked_subcommand is None:
        context.invoke(datasets_list)


@datasets.command("list")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="How many datasets, newest first.")
def datasets_list(limit: int = 50) -> None:
    """Your datasets, newest first: id, name, format, rows, features, target, size, age."""
    from torchyard import show

    page = _call(_client().datasets, limit=limit)
    show.echo(show.datasets_table(page["datasets"], _now()))
    if page["next_cursor"]:
        click.echo(f"(the newest {limit}; --limit shows more)", err=True)


@datasets.command("delete")
@click.argument("dataset_id")
def datasets_delete(dataset_id: str) -> None:
    """Delete a dataset that no queued or running job uses."""
    _call(_client().delete_dataset, dataset_id)
    click.echo(f"deleted {dataset_id}")


# --- sweeps ---------------------------------------------------------------------------------------

SWEEP_POLL_SECONDS = 1.0  # two reads a poll: far inside the read budget (rate_limit_read)


@main.group()
def sweep() -> None:
    """Hyperparameter sweeps: trials that are ordinary jobs, and ASHA stopping the losers early."""


@sweep.command("submit")
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--follow", is_flag=True, help="Show the trials' progress until the sweep ends (exit 1 unless it "
                                             "succeeded).")
def sweep_submit(sweep_file: Path, follow: bool) -> None:
    """Submit the sweep request in SWEEP_FILE (a base spec, a space, a method, trials…) and print its id.

    A base spec whose data is a local file (data.source "file") goes as a dataset of yours, uploaded first
    when none holds that file already, as `torchyard submit` does.
    """
    client = _client()
    request, uploaded = _read_spec_file(sweep_file), None
    if isinstance(request, dict) and isinstance(request.get("base"), dict):
        base, uploaded = _file_data_uploaded(client, request["base"], sweep_file)
        request = {**request, "base": base}
    try:
        swept = _call(client.submit_sweep, request)
    except click.ClickException:
        if uploaded is not None:
            _forget_upload(client, uploaded)
        raise
    click.echo(swept["id"])
    if follow and _follow_sweep(client, swept)["status"] != "succeeded":
        sys.exit(1)


def _follow_sweep(client, started: dict) -> dict:
    """A line for each trial whose state changed, and the counts and best so far whenever they change, until
    the sweep ends; then how it ended and how to download its best trial. Returns the ended sweep."""
    import shlex

    from torchyard import show

    states: dict[int, str] = {}
    said, swept = None, started
    with _api_errors():
        for swept, trials in client.follow_sweep(started["id"], SWEEP_POLL_SECONDS):
            for trial in trials:
                before = states.get(trial["number"])
                if before != trial["state"]:
                    states[trial["number"]] = trial["state"]
                    # A paused trial queued again was promoted to the next rung: said so, not as a fresh start
                    # (also when it paused and went on between two polls, or before the first: it has a rung).
                    promoted = trial["state"] in ("queued", "running") and (
                        before == "paused" or (before in (None, "running") and trial["rung"] is not None))
                    click.echo(show.trial_line(trial, swept["metric"], "promoted" if promoted else None))
            line = show.sweep_progress_line(swept)
            if line != said:
                click.echo(line)
                said = line
    click.echo(show.sweep_ending(swept))
    if swept["status"] == "succeeded" and swept.get("best"):
        out = shlex.quote(f"runs/{swept['name']}")
        click.echo(f"download the best: torchyard download {swept['best']['job_id']} --out {out}")
    return swept


@sweep.command("status")
@click.argument("sweep_id")
@click.option("--follow", is_flag=True, help="Show the trials' progress until the sweep ends.")
@click.option("--json", "as_json", is_flag=True, help="The sweep as the API's JSON document.")
def sweep_status(sweep_id: str, follow: bool, as_json: bool) -> None:
    """A sweep's state: status, method, metric, its trials by state, the best trial and its parameters."""
    from torchyard import show

    client = _client()
    swept = _call(client.sweep, sweep_id)
    if as_json:
        _echo_json(swept)
    elif follow:
        if _follow_sweep(client, swept)["status"] != "succeeded":
            sys.exit(1)
    else:
        show.echo(show.sweep_summary(swept, _now()))


@sweep.command("trials")
@click.argument("sweep_id")
@click.option("--json", "as_json", is_flag=True, help="The trials as the API's JSON documents, by number.")
def sweep_trials(sweep_id: str, as_json: bool) -> None:
    """A sweep's trials best first: job, state (paused at a rung, pruned…), epochs, rung, the metric, params."""
    from torchyard import show

    client = _client()
    swept = _call(client.sweep, sweep_id)
    trials = _call(client.sweep_trials, sweep_id)
    if as_json:
        _echo_json(trials)
    else:
        show.echo(show.trials_table(trials, swept["metric"], swept["mode"]))


@sweep.command("list")
@click.option("--limit", type=LIMIT, default=20, show_default=True, help="How many sweeps, newest first.")
def sweep_list(limit: int) -> None:
    """Your newest sweeps: id, name, status, trials ended of all, best metric, age."""
    from torchyard import show

    page = _call(_client().sweeps, limit=limit)
    show.echo(show.sweeps_table(page["sweeps"], _now()))
    if page["next_cursor"]:
        click.echo(f"(the newest {limit}; --limit shows more)", err=True)


@sweep.command("cancel")
@click.argument("sweep_id")
def sweep_cancel(sweep_id: str) -> None:
    """Cancel a running sweep: no trial starts any more, and its unfinished trials are cancelled (a running one
    stops at its next batch). Cancelling a cancelled sweep is no error."""
    from torchyard.client import ApiError

    client = _client()
    with _api_errors():
        try:
            swept = client.cancel_sweep(sweep_id)
        except ApiError as error:
            if error.status != 409:
                raise
            swept = client.sweep(sweep_id)  # ended already: cancelled is what was asked; anything else says why not
            if swept["status"] != "cancelled":
                raise error from None
            click.echo(f"{sweep_id} was cancelled already")
            return
    running = swept["counts"]["running"]
    stops = f"{running} running trial{'s stop' if running > 1 else ' stops'} at the end of the current batch"
    click.echo(f"{swept['id']} cancelled" + (f": {stops}" if running else ""))


@sweep.command("delete")
@click.argument("sweep_id")
def sweep_delete(sweep_id: str) -> None:
    """Delete an ended sweep with its trial jobs, their metrics and their files."""
    _call(_client().delete_sweep, sweep_id)
    click.echo(f"deleted {sweep_id}")


@main.command()
@click.argument("model")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A CSV file of rows of features (a header naming the columns is allowed; a target column in "
                   "it is left out).")
@click.option("--output", "output_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the predictions to this CSV file instead of printing them.")
@click.option("--proba", is_flag=True, help="Class probabilities instead of labels (classifiers).")
def predict(model: str, input_path: Path, output_path: Path | None, proba: bool) -> None:
    """Predict with MODEL (a job id, a model folder or a bundle .tar.gz) for each row of --input."""
    from torchyard.predict import load_for_prediction, predict_csv

    try:
        lines = predict_csv(_call(load_for_prediction, model, _client), input_path, output_path, proba)
    except (ValueError, OSError) as error:  # a model, bundle or file that can't be used: said plainly
        raise click.ClickException(str(error)) from None
    for line in lines:
        click.echo(line)
    if output_path is not None:
        click.echo(f"saved to {output_path}", err=True)


if __name__ == "__main__":
    main()
