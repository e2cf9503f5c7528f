"""gunicorn's server hooks for ``torchyard api`` and ``serve`` (``--config python:api.gunicorn_hooks``): the
files in which prometheus-client's multiprocess mode keeps each API process's metrics, so that a scrape sums
them all; and a worker's warm-up.

``torchyard api`` names the folder in PROMETHEUS_MULTIPROC_DIR before gunicorn starts (``metrics_directory``):
prometheus-client reads that variable when it is imported, in every process gunicorn forks. gunicorn's master
runs the hooks but ``post_worker_init``, which each worker runs; every module-level name here that gunicorn
knows as a setting is one.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

# gunicorn's own setting (25.1 and later; older ones ignore the name): no control socket. Every gunicorn of a
# user shares one default path ($HOME/.gunicorn/gunicorn.ctl), so a second API server on the machine (or a test's)
# took it over, and the first to stop deleted the other's; torchyard runs its servers itself.
control_socket_disable = True

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
OWN_PREFIX = "torchyard-api-metrics-"  # a folder ``metrics_directory`` made, which on_exit removes


def metrics_directory() -> str:
    """The folder of the metric files: PROMETHEUS_MULTIPROC_DIR when the operator set it (one per
    ``torchyard api``: its files are deleted at start), else a new one in the temporary folder."""
    return os.environ.get(VARIABLE) or tempfile.mkdtemp(prefix=OWN_PREFIX)


def on_starting(server) -> None:
    """Make the folder if need be, and delete the files of an earlier run: they would be summed into this one's."""
    directory = _delete_files()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)


def post_worker_init(worker) -> None:
    """Import scikit-learn in the background as the worker starts: its first spec naming a scikit-learn
    dataset took 1.5 s for the import (bench/queue_latency.py's max), and the worker answers meanwhile."""
    threading.Thread(target=_warm_up, name=WARM_UP_THREAD, daemon=True).start()


def _warm_up() -> None:
    """Import scikit-learn, then move every object this process holds so far out of the garbage collector's
    sight (gc.freeze): the app's and the libraries' objects live as long as the process, and a full collection
    then walks only what requests allocate, nor does it write to the pages shared with the master."""
    import gc

    from models.catalog import warm_up

    warm_up()
    gc.freeze()


WARM_UP_THREAD = "torchyard-warm-up"


def child_exit(server, worker) -> None:
    """A worker process exited: drop the files of its live gauges (prometheus-client's rule for a dead process;
    the API has none today). Its counters and histograms stay, and are still summed: what it counted happened,
    and a Prometheus counter must never go down."""
    from prometheus_client import multiprocess  # imported after PROMETHEUS_MULTIPROC_DIR was set

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Leave nothing behind: the files, and the folder if it was made for this run."""
    directory = _delete_files()
    if directory is not None and directory.name.startswith(OWN_PREFIX):
        directory.rmdir()


def _delete_files() -> Path | None:
    value = os.environ.get(VARIABLE)
    if not value:
        return None
    directory = Path(value)
    for path in directory.glob("*.db"):  # glob of a missing folder: nothing
        path.unlink(missing_ok=True)
    return directory
