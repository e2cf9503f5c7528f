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
import zlib
from collections.abc import Callable
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


def read_bundle(source: str | Path | IO[bytes], weights_limit: Callable[[bytes], int] | None = None
                ) -> dict[str, bytes]:
    """The bundle's files by name (``model.json`` and ``weights.safetensors`` at least), from a path or a
    seekable binary file object; BundleError for anything that isn't a bundle.

    ``weights_limit(card)``, when given, says from the model card how many bytes the weights may be; the
    weights member's size, as its tar header declares it, is checked against it before a byte of it is read
    (whatever the members' order), so a small archive can't unpack into gigabytes."""
    prefix = f"{source}: " if isinstance(source, (str, Path)) else ""  # a file is named; a download isn't
    try:
        with tarfile.open(source, mode="r:*") if prefix else tarfile.open(fileobj=source, mode="r:*") as archive:
            return _members(archive, weights_limit)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleError(f"{prefix}not a readable .tar.gz bundle: {exc}") from None
    except BundleError as exc:
        raise BundleError(f"{prefix}{exc}") from None


def _members(archive: tarfile.TarFile, weights_limit: Callable[[bytes], int] | None) -> dict[str, bytes]:
    """The allowed members' contents; the weights read last, once the card has bounded their size."""
    files: dict[str, bytes] = {}
    weights: tarfile.TarInfo | None = None
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
        if name in files or (name == WEIGHTS and weights is not None):
            raise BundleError(f"{name} appears twice")
        _check_size(member, MAX_BYTES[name])
        if name == WEIGHTS:
            weights = member  # read after the card, which says how big the weights may be
            if CARD in files and weights_limit is not None:  # known now: checked before skipping past it
                _check_size(member, weights_limit(files[CARD]), f"what the network of {CARD} needs")
        else:
            files[name] = _read(archive, member)
    missing = [name for name, there in ((CARD, CARD in files), (WEIGHTS, weights is not None)) if not there]
    if missing:
        raise BundleError(f"the bundle lacks {', '.join(missing)}")
    if weights_limit is not None:
        _check_size(weights, weights_limit(files[CARD]), f"what the network of {CARD} needs")
    files[WEIGHTS] = _read(archive, weights)
    return files


def _check_size(member: tarfile.TarInfo, limit: int, what: str = "") -> None:
    """Refuses a member by the size its tar header declares, before it is read."""
    if member.size > limit:
        raise BundleError(f"{member.name!r} is {member.size} bytes; at most {limit}{f' ({what})' if what else ''}")


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    with archive.extractfile(member) as stream:
        data = stream.read(member.size)
    if len(data) != member.size:
        raise BundleError(f"{member.name!r} is cut short: {len(data)} of its {member.size} bytes")
    return data


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
