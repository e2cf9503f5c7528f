"""Refresh the dashboard's vendored JavaScript: ``python -m api.vendor``.

Each package is pinned here by name and version. Its tarball comes from the npm registry, is checked
against the sha512 integrity the registry's metadata states for that version, and only the files the
dashboard serves (and the package's licence) are extracted into ``api/static/vendor/<package>/``. A
manifest there records each package's version, integrity and the sha256 of every file, so a test can tell,
without the network, that the committed files are the pinned ones. The API never fetches anything at run
time: this runs only when someone refreshes the pins.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
VENDOR = Path(__file__).resolve().parent / "static" / "vendor"
MANIFEST = VENDOR / "manifest.json"


@dataclass(frozen=True)
class Package:
    """An npm package pinned to a version, and the files of its tarball (under ``package/``) to keep."""

    name: str
    version: str
    files: tuple[str, ...]

    @property
    def tarball(self) -> str:
        return f"{REGISTRY}/{self.name}/-/{self.name}-{self.version}.tgz"

    @property
    def metadata(self) -> str:
        return f"{REGISTRY}/{self.name}/{self.version}"


PACKAGES = (
    # The charts: one small script (about 50 KB) that draws thousands of points on a canvas.
    Package("uplot", "1.6.32", ("dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE")),
    # /docs: the bundle carries its dependencies; its .LICENSE.txt lists theirs.
    Package("swagger-ui-dist", "5.35.0", ("swagger-ui-bundle.js", "swagger-ui-bundle.js.LICENSE.txt",
                                          "swagger-ui.css", "LICENSE", "NOTICE")),
)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def checked_tarball(package: Package) -> bytes:
    """The package's tarball, once its sha512 matches the integrity the registry states for the version."""
    integrity = json.loads(_get(package.metadata))["dist"]["integrity"]
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise SystemExit(f"{package.name}@{package.version}: the registry states {algorithm}, not sha512")
    data = _get(package.tarball)
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise SystemExit(f"{package.name}@{package.version}: the tarball's sha512 is {actual}, the registry "
                         f"states {expected}; nothing written")
    return data


def extract(package: Package, tarball: bytes, into: Path) -> dict[str, str]:
    """Write the package's kept files into ``into`` (flat, by base name), replacing what was there; their
    sha256 by name."""
    into.mkdir(parents=True, exist_ok=True)
    for old in into.iterdir():  # a file an earlier version kept and this one doesn't must not linger
        old.unlink()
    digests = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in package.files:
            source = tar.extractfile(f"package/{member}")  # a regular file of the tarball, or KeyError
            if source is None:
                raise SystemExit(f"{package.name}: package/{member} is not a regular file")
            data = source.read()
            name = Path(member).name
            (into / name).write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def refresh(vendor: Path = VENDOR) -> dict:
    """Download, check and extract every pinned package into ``vendor``; write and return the manifest."""
    manifest = {}
    for package in PACKAGES:
        tarball = checked_tarball(package)
        files = extract(package, tarball, vendor / package.name)
        manifest[package.name] = {"version": package.version, "tarball": package.tarball,
                                  "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
                                  "files": files}
        print(f"{package.name}@{package.version}: {', '.join(sorted(files))}", file=sys.stderr)
    (vendor / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


if __name__ == "__main__":
    refresh()
