"""The one reader of a job's bundle, the .tar.gz that ``GET /jobs/{id}/weights?format=bundle`` serves.

A bundle holds ``weights.safetensors``, ``model.json`` and ``metrics.jsonl`` at its top level, so
``tar xzf JOB.tar.gz -C model/`` makes a folder ``torchyard.load_model`` reads. Bundles are read here in
memory and by allow-list: plain files of these names only (at the top, or under one folder as older
bundles and a hand-made ``tar czf m.tar.gz model/`` have them), each within a size limit, a handful of
members at most. Anything else (a link, a device, ``../x``, ``/etc/x``, another name) is
refused, so a hostile archive can't write, read or fill anything. Standard library only: the client uses it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO

WEIGHTS = "weights.safetensors"
CARD = "model.json"
METRICS = "metrics.jsonl"
# The largest each file may be: far past what a job of the service makes (50 M parameters are 200 MB of
# float32), far short of what would exhaust a machine's memory.
MAX_BYTES = {WEIGHTS: 4 * 1024**3, CARD: 64 * 1024**2, METRICS: 512 * 1024**2}
# Members looked at before the archive is refused: three files and a folder or two, never thousands.
MAX_MEMBERS = 8


class BundleError(ValueError):
    """An archive that isn't a bundle of a torchyard model, with what is wrong with it."""


def read_bundle(source: str | Path | IO[bytes]) -> dict[str, bytes]:
    """The bundle's files by name (``model.json`` and ``weights.safetensors`` at least), from a path or a
    binary file object; BundleError for anything that isn't a bundle."""
    try:
        if isinstance(source, (str, Path)):
            with tarfile.open(source, mode="r:*") as archive:
                files = _members(archive)
        else:
            with tarfile.open(fileobj=source, mode="r:*") as archive:
                files = _members(archive)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"not a readable .tar.gz bundle: {exc}") from None
    missing = [name for name in (CARD, WEIGHTS) if name not in files]
    if missing:
        raise BundleError(f"the bundle lacks {', '.join(missing)}")
    return files


def _members(archive: tarfile.TarFile) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    for count, member in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise BundleError(f"more than {MAX_MEMBERS} members; a bundle holds {WEIGHTS}, {CARD} and {METRICS}")
        parts = _parts(member.name)
        if member.isdir() and len(parts) <= 1:
            folders.update(parts)
            continue
        name = parts[-1] if parts else ""
        if not member.isfile() or name not in MAX_BYTES or len(parts) > 2:
            raise BundleError(f"unexpected member {member.name!r}: a bundle holds only the files {WEIGHTS}, "
                              f"{CARD} and {METRICS}, at its top or in one folder")
        folders.update(parts[:-1])
        if len(folders) > 1:
            raise BundleError(f"members in more than one folder ({', '.join(sorted(map(repr, folders)))})")
        if name in files:
            raise BundleError(f"{name} appears twice")
        if member.size > MAX_BYTES[name]:
            raise BundleError(f"{member.name!r} is {member.size} bytes; at most {MAX_BYTES[name]}")
        with archive.extractfile(member) as stream:
            files[name] = stream.read(member.size)
    return files


def _parts(name: str) -> list[str]:
    """A member's path as its folders and name, ``./`` and a trailing ``/`` dropped; refused when it is
    absolute or climbs out (``..``)."""
    if name.startswith(("/", "\\")) or "\\" in name:
        raise BundleError(f"unexpected member {name!r}: an absolute or Windows path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"unexpected member {name!r}: a path that climbs out of the folder")
    return parts


def write_bundle_files(files: dict[str, bytes], directory: str | Path) -> Path:
    """The files of a read bundle into ``directory`` (made if missing), ready for ``load_model``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
