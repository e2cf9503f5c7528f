"""The fsspec artifact store: put, read, delete, and nothing outside its root."""

from __future__ import annotations

import hashlib

import pytest

from models.storage import ArtifactStore


def test_put_read_and_delete_a_file(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    local = tmp_path / "w.bin"
    local.write_bytes(b"weights")
    uri, size, sha256 = store.put_file(str(local), "jobs/j1/weights.safetensors")
    assert uri == f"file://{tmp_path}/store/jobs/j1/weights.safetensors"
    assert (size, sha256) == (7, hashlib.sha256(b"weights").hexdigest())
    with store.open(uri) as f:
        assert f.read() == b"weights"
    copy = tmp_path / "copy.bin"
    store.get_file("jobs/j1/weights.safetensors", str(copy))
    assert copy.read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "store" / "jobs" / "j1").iterdir()) == ["weights.safetensors"]
    assert store.delete(uri) is True
    assert store.delete(uri) is False
    assert not store.exists("jobs/j1/weights.safetensors")


def test_put_bytes_and_delete_a_tree(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    uri, size, _ = store.put_bytes(b"abc", "jobs/j2/checkpoints/epoch-0001.pt")
    assert size == 3 and store.exists(uri)
    other, _, _ = store.put_bytes(b"de", "jobs/j2/attempt-2/weights.safetensors")
    assert store.list_uris("jobs/j2") == sorted([uri, other])
    assert store.list_uris("jobs/none") == []
    store.delete_tree("jobs/j2")
    assert not store.exists("jobs/j2")
    store.delete_tree("jobs/j2")  # already gone is fine


def test_an_fsspec_url_other_than_a_folder_works(tmp_path):
    store = ArtifactStore("memory://torchyard-test-store")
    uri, _, _ = store.put_bytes(b"m", "datasets/ds_1.csv")
    assert uri.startswith("memory://")
    with store.open("datasets/ds_1.csv") as f:
        assert f.read() == b"m"
    store.delete(uri)


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "a/../../outside", "file:///etc/passwd", "."])
def test_keys_outside_the_root_are_refused(tmp_path, key):
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError):
        store.open(key)
