"""Uploading, listing and deleting datasets, and jobs that train on them."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

DATASETS = "/api/v1/datasets"

CSV = "x1,x2,label\n0.5,1.5,0\n1.0,-2.0,1\n3.25,0,1\n"


def upload(client, headers, content: bytes, filename: str, **form):
    return client.post(DATASETS, data={"file": (io.BytesIO(content), filename), **form}, headers=headers,
                       content_type="multipart/form-data")


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def stored_files(artifacts_url: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(artifacts_url) for name in names]


def test_a_csv_upload_is_stored_under_a_server_made_name(client, alice, store, artifacts_url):
    response = upload(client, alice, CSV.encode(), "../../etc/my data.csv", target="label")
    assert response.status_code == 201
    dataset = response.json
    assert dataset["format"] == "csv"
    assert (dataset["n_rows"], dataset["n_features"], dataset["n_classes"]) == (3, 2, 2)
    assert dataset["columns"] == ["x1", "x2", "label"]
    assert dataset["target"] == "label"
    assert dataset["name"] == "../../etc/my data.csv"  # a label only; the file's key is the server's
    assert stored_files(artifacts_url) == [os.path.join(artifacts_url, "datasets", f"{dataset['id']}.csv")]
    assert store.open(f"datasets/{dataset['id']}.csv").read() == CSV.encode()
    assert client.get(f"{DATASETS}/{dataset['id']}", headers=alice).json == dataset
    # A list shows how many columns, not their names: a header may be thousands wide.
    summary = {key: value for key, value in dataset.items() if key != "columns"}
    assert client.get(DATASETS, headers=alice).json == {"datasets": [{**summary, "n_columns": 3}],
                                                        "next_cursor": None}


def test_an_npz_upload_records_its_shapes(client, alice):
    x = np.arange(40, dtype=np.float32).reshape(10, 1, 2, 2)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    dataset = upload(client, alice, npz_bytes(X=x, y=y), "images.npz").json
    shape = (dataset["n_rows"], dataset["n_features"], dataset["n_targets"], dataset["n_classes"])
    assert shape == (10, 4, 1, 3)
    assert dataset["columns"] is None


@pytest.mark.parametrize(("content", "message"), [
    ("x1,x2,label\n0.5,oops,0\n", "line 2, column 'x2': 'oops' is not a number"),
    ("x1,x2,label\n0.5,1\n", "line 2 has 2 values"),
    ("x1,x2,label\n", "no rows"),
    ("", "empty"),
    ("x1,x2,label\n1,nan,0\n", "finite"),
])
def test_a_malformed_csv_is_refused_and_leaves_no_file(client, alice, artifacts_url, content, message):
    response = upload(client, alice, content.encode(), "bad.csv")
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert response.json["errors"][0]["path"] == "file"
    assert message in response.json["errors"][0]["message"]
    assert stored_files(artifacts_url) == []
    assert client.get(DATASETS, headers=alice).json["datasets"] == []


def test_an_unknown_target_column_is_refused(client, alice):
    response = upload(client, alice, CSV.encode(), "d.csv", target="y")
    assert response.status_code == 422
    assert response.json["errors"][0]["path"] == "target"


def test_an_npz_with_an_object_array_is_refused_without_unpickling(client, alice, artifacts_url, monkeypatch):
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("an upload was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    content = npz_bytes(X=np.array([[1.0], [2.0]]), y=np.array([{"a": 1}, None], dtype=object))
    response = upload(client, alice, content, "evil.npz")
    assert response.status_code == 422
    assert response.json["errors"][0]["path"] == "y"
    assert "object" in response.json["errors"][0]["message"]
    assert stored_files(artifacts_url) == []


@pytest.mark.parametrize(("content", "path"), [
    (b"not a zip", "file"),
    (npz_bytes(features=np.zeros((2, 2)), y=np.zeros(2)), "file"),
    (npz_bytes(X=np.zeros((3, 2)), y=np.zeros(2)), "y"),
    (npz_bytes(X=np.zeros(3), y=np.zeros(3)), "X"),
    (npz_bytes(X=np.array([["a"], ["b"]]), y=np.zeros(2)), "X"),
])
def test_a_malformed_npz_is_refused(client, alice, artifacts_url, content, path):
    response = upload(client, alice, content, "bad.npz")
    assert response.status_code == 422
    assert response.json["errors"][0]["path"] == path
    assert stored_files(artifacts_url) == []


def test_an_upload_of_another_kind_is_refused(client, alice):
    assert upload(client, alice, b"{}", "data.json").status_code == 422
    missing = client.post(DATASETS, data={"name": "x"}, headers=alice, content_type="multipart/form-data")
    assert missing.status_code == 422
    assert missing.json["errors"][0]["path"] == "file"


def test_an_oversize_upload_is_a_413_problem(make_app, artifacts_url, tokens):
    client = make_app(max_upload_bytes=1000).test_client()
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    response = upload(client, headers, b"x1,y\n" + b"1,0\n" * 1000, "big.csv")
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    assert response.json["title"] == "Content Too Large"
    assert response.json["detail"] == "the request body is larger than 1000 bytes (max_upload_bytes)"
    assert stored_files(artifacts_url) == []
    assert upload(client, headers, b"x1,y\n1,0\n", "small.csv").status_code == 201


def test_datasets_are_listed_newest_first_a_page_at_a_time(client, alice, bob):
    ids = [upload(client, alice, CSV.encode(), f"d{i}.csv").json["id"] for i in range(5)]
    pages, cursor = [], None
    while True:
        query = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = client.get(DATASETS, headers=alice, query_string=query).json
        pages.append([dataset["id"] for dataset in page["datasets"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    assert [d["n_columns"] for d in client.get(DATASETS, headers=alice).json["datasets"]] == [3] * 5
    assert client.get(DATASETS, headers=bob).json == {"datasets": [], "next_cursor": None}
    for query, path in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"cursor": "x"}, "cursor")):
        response = client.get(DATASETS, headers=alice, query_string=query)
        assert response.status_code == 422
        assert response.json["errors"][0]["path"] == path


def test_deleting_a_dataset_removes_its_file(client, alice, bob, artifacts_url):
    dataset_id = upload(client, alice, CSV.encode(), "d.csv").json["id"]
    assert client.get(f"{DATASETS}/{dataset_id}", headers=bob).status_code == 404
    assert client.delete(f"{DATASETS}/{dataset_id}", headers=bob).status_code == 404
    assert client.get(DATASETS, headers=bob).json["datasets"] == []
    assert len(stored_files(artifacts_url)) == 1
    assert client.delete(f"{DATASETS}/{dataset_id}", headers=alice).status_code == 204
    assert stored_files(artifacts_url) == []
    assert client.get(f"{DATASETS}/{dataset_id}", headers=alice).status_code == 404


def dataset_spec(spec: dict, dataset_id: str, **data) -> dict:
    spec["data"] = {"source": "dataset", "dataset_id": dataset_id, **data}
    return spec


def test_a_job_on_a_dataset_is_checked_against_its_shape(client, alice, spec):
    dataset_id = upload(client, alice, CSV.encode(), "d.csv", target="label").json["id"]
    response = client.post("/api/v1/jobs", json=dataset_spec(spec, dataset_id), headers=alice)
    assert response.status_code == 201
    assert response.json["spec"]["data"]["target"] == "label"  # the upload's default, written down
    spec["model"]["layers"][2]["out_features"] = 2
    wrong = client.post("/api/v1/jobs", json=spec, headers=alice)
    assert wrong.status_code == 422
    assert wrong.json["errors"][0]["path"] == "model.layers[2]"
    as_multiclass = client.post("/api/v1/jobs", json={**spec, "task": "multiclass"}, headers=alice)
    assert as_multiclass.status_code == 201


def test_a_job_names_a_dataset_target_and_shape_that_exist(client, alice, bob, spec):
    dataset = upload(client, alice, CSV.encode(), "d.csv").json
    assert dataset["target"] == "label"  # the last column, as the engine reads it
    dataset_id = dataset["id"]
    cases = [
        (dataset_spec(dict(spec), dataset_id, target="lable"), "data.target"),
        (dataset_spec(dict(spec), dataset_id, target="x1"), "task"),  # x1 is continuous: not binary labels
        (dataset_spec(dict(spec), dataset_id, target="label", image_shape=[1, 3, 1]), "data.image_shape"),
    ]
    for body, path in cases:
        response = client.post("/api/v1/jobs", json=body, headers=alice)
        assert response.status_code == 422, body
        assert response.json["errors"][0]["path"] == path
    # bob can't train on alice's dataset: to him it does not exist.
    body = dataset_spec(dict(spec), dataset_id, target="label")
    response = client.post("/api/v1/jobs", json=body, headers=bob)
    assert response.status_code == 422
    assert response.json["errors"][0]["path"] == "data.dataset_id"


def test_a_dataset_in_use_by_an_unfinished_job_is_kept(client, alice, spec, set_job):
    dataset_id = upload(client, alice, CSV.encode(), "d.csv", target="label").json["id"]
    job_id = client.post("/api/v1/jobs", json=dataset_spec(spec, dataset_id), headers=alice).json["id"]
    response = client.delete(f"{DATASETS}/{dataset_id}", headers=alice)
    assert response.status_code == 409
    assert job_id in response.json["detail"]
    set_job(job_id, status="failed")
    assert client.delete(f"{DATASETS}/{dataset_id}", headers=alice).status_code == 204


def test_classes_are_counted_as_the_engine_counts_them(client, alice):
    def classes(labels: str) -> int | None:
        content = "x,y\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels.split()))
        return upload(client, alice, content.encode(), "c.csv").json["n_classes"]

    assert classes("0 2 2") == 3  # labels 0..k-1: the largest + 1
    assert classes("0 0") == 2
    assert classes("-1 1") is None
    assert classes("0.5 1") is None
