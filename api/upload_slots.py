"""Who may upload now: at most ``max_concurrent_uploads`` uploads in progress per user on one API host.

An upload holds a host's memory, disk and a thread while its body arrives and is checked, so the bound is
per host, on what each host holds. A slot is an exclusive ``flock`` on one of N small files named by the
deployment (its database) and the user, in this host's temporary folder: every API process on the host (all
of gunicorn's workers) sees the same files, so the count holds across them, and the kernel drops a lock
when its process dies, so a crash never leaves a slot taken. Over the bound: 429 problem+json with
Retry-After, before the body is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from api.errors import ApiError
from models.settings import Settings

# When to ask again after a 429: an upload takes seconds.
RETRY_AFTER_SECONDS = 5


def slot_folder(database_url: str) -> Path:
    """Where a deployment's (its database's) upload slots lie on this host."""
    deployment = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"torchyard-upload-slots-{deployment}"


@contextlib.contextmanager
def upload_slot(settings: Settings, user_id: str) -> Iterator[None]:
    """Hold one of the user's upload slots on this host while the block runs; 429 when all are held."""
    folder = slot_folder(settings.database_url)
    folder.mkdir(parents=True, exist_ok=True)
    user = hashlib.sha256(user_id.encode()).hexdigest()[:24]
    limit = settings.max_concurrent_uploads
    for number in range(limit):
        descriptor = os.open(folder / f"{user}.{number}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        try:
            yield
        finally:
            os.close(descriptor)  # closing the file releases its lock
        return
    raise ApiError(
        429,
        "Too Many Requests",
        f"{limit} upload(s) of yours are in progress on this server, the most allowed at once "
        "(TORCHYARD_MAX_CONCURRENT_UPLOADS); retry when one has finished",
        kind="too-many-uploads",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
