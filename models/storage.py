"""The artifact store: files of jobs and datasets under one fsspec URL (a local folder, ``s3://…``, …).

Keys are relative paths under the store's root (``datasets/ds_1.csv``, ``jobs/job_1/weights.safetensors``);
rows in the database keep the full URI that ``put_*`` returns. Torch-free, so the API and workers share it.
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
from typing import IO

from fsspec.core import url_to_fs

CHUNK = 1024 * 1024


def job_prefix(job_id: str) -> str:
    """The folder (key prefix) under which a job's artifacts live."""
    return f"jobs/{job_id}"


def sha256_file(path: str) -> tuple[int, str]:
    """Size and SHA-256 hex digest of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class ArtifactStore:
    """Put, read and delete files under one fsspec root URL."""

    def __init__(self, url: str):
        self.fs, root = url_to_fs(url)
        self.root = root.rstrip("/")
        self.root_uri = self.fs.unstrip_protocol(self.root)
        # Local writes go through a temporary name and a rename, so a reader never sees half a file;
        # object stores make a put visible only when it completes anyway.
        self._local = "file" in _protocols(self.fs)

    def path(self, key_or_uri: str) -> str:
        """The filesystem path of a key or of a URI inside this store (anything else is refused)."""
        if "://" in key_or_uri:
            if not key_or_uri.startswith(self.root_uri + "/"):
                raise ValueError(f"{key_or_uri!r} is not in the artifact store {self.root_uri!r}")
            key_or_uri = key_or_uri[len(self.root_uri) + 1 :]
        key = posixpath.normpath(key_or_uri)
        # Keys come from the server, but a path outside the root must never be reachable all the same.
        if key.startswith(("/", "..")) or key == ".":
            raise ValueError(f"{key_or_uri!r} is not a relative key inside the store")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        """The URI that rows record for ``key``."""
        return self.fs.unstrip_protocol(self.path(key))

    def put_file(self, local_path: str, key: str) -> tuple[str, int, str]:
        """Copy a local file to ``key``; return ``(uri, size, sha256)``."""
        size, digest = sha256_file(local_path)
        target = self.path(key)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self._local:
            temporary = f"{target}.tmp-{secrets.token_hex(4)}"
            self.fs.put_file(local_path, temporary)
            self.fs.mv(temporary, target)
        else:
            self.fs.put_file(local_path, target)
        return self.uri(key), size, digest

    def put_bytes(self, data: bytes, key: str) -> tuple[str, int, str]:
        """Write ``data`` to ``key``; return ``(uri, size, sha256)``."""
        target = self.path(key)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{secrets.token_hex(4)}" if self._local else target
        self.fs.pipe_file(temporary, data)
        if temporary != target:
            self.fs.mv(temporary, target)
        return self.uri(key), len(data), hashlib.sha256(data).hexdigest()

    def open(self, key_or_uri: str) -> IO[bytes]:
        """A binary file object for streaming reads; the caller closes it."""
        return self.fs.open(self.path(key_or_uri), "rb")

    def get_file(self, key_or_uri: str, local_path: str) -> None:
        """Copy a stored file to a local path."""
        self.fs.get_file(self.path(key_or_uri), local_path)

    def exists(self, key_or_uri: str) -> bool:
        """Whether a file (or folder) is stored under the key."""
        return self.fs.exists(self.path(key_or_uri))

    def delete(self, key_or_uri: str) -> bool:
        """Remove one file; False when it was already gone (deletes are retried, so that's fine)."""
        path = self.path(key_or_uri)
        if not self.fs.exists(path):
            return False
        self.fs.rm_file(path)
        return True

    def list_uris(self, key: str) -> list[str]:
        """The URIs of every file under a folder key, read fresh from the store (none if there's no folder)."""
        path = self.path(key)
        self.fs.invalidate_cache(path)  # an object store's cached listing may predate the latest writes
        if not self.fs.exists(path):
            return []
        return sorted(self.fs.unstrip_protocol(found) for found in self.fs.find(path))

    def delete_tree(self, key: str) -> None:
        """Remove a folder and everything under it, if it exists."""
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
