"""Models that predict: string class labels train and come back as themselves; load_model's predict and
predict_proba (probabilities, image_shape, standardization, feature counts); bundles as folders and as
.tar.gz, hostile ones refused; ``torchyard predict`` on a folder, a bundle and a job of the service."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import served
from sklearn.datasets import load_digits, load_iris

import torchyard
from models.spec import SpecError
from models.validation import parse_spec
from torchyard.bundle import BundleError
from torchyard.client import ApiError, Client
from worker.engine import CARD, WEIGHTS, train
from worker.engine.data import split_indices
from worker.engine.outputs import METRICS

EXAMPLES = Path(__file__).parent.parent / "examples"
IRIS_CSV = EXAMPLES / "data" / "iris.csv"
IRIS = load_iris()
SPECIES = IRIS.target_names[IRIS.target]  # 'setosa', 'versicolor', 'virginica' for each row

IRIS_SPEC = {
    "name": "iris", "seed": 0, "task": "multiclass",
    "data": {"source": "file", "path": str(IRIS_CSV), "target": "species", "validation_split": 0.2,
             "standardize": True},
    "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                         {"type": "Linear", "out_features": 3}]},
    "optimizer": {"type": "Adam", "lr": 0.05},
    "training": {"epochs": 30, "batch_size": 16},
}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "torchyard.cli", *args], capture_output=True, text=True,
                          env=env or os.environ, timeout=180)


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory) -> Path:
    """A multiclass model trained on the example CSV, whose labels are species names."""
    out = tmp_path_factory.mktemp("iris")
    result = train(parse_spec(IRIS_SPEC), out)
    assert result.status == "succeeded"
    return out


# --- string labels ---------------------------------------------------------------------------------


def test_string_labels_train_and_predict_as_the_labels_of_the_data(iris_model):
    card = json.loads((iris_model / CARD).read_text())
    assert card["classes"] == ["setosa", "versicolor", "virginica"]  # sorted: class i is the i-th
    assert card["features"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    model = torchyard.load_model(iris_model)
    predicted = model.predict(IRIS.data)
    assert predicted.shape == (150,) and set(predicted) <= set(card["classes"])
    assert (predicted == SPECIES).mean() > 0.9
    assert list(model.predict(IRIS.data[0].tolist())) == ["setosa"]  # a single row, as a list


def test_predict_proba_rows_sum_to_one_and_agree_with_predict(iris_model):
    model = torchyard.load_model(iris_model)
    proba = model.predict_proba(IRIS.data)
    assert proba.shape == (150, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)
    assert (np.array(model.classes)[proba.argmax(axis=1)] == model.predict(IRIS.data)).all()


def test_binary_probabilities_are_two_columns_one_minus_p_and_p(tmp_path):
    spec = parse_spec({"seed": 1, "task": "binary",
                       "data": {"source": "sklearn", "name": "load_breast_cancer", "standardize": True},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]},
                       "optimizer": {"type": "Adam", "lr": 0.05}, "training": {"epochs": 5, "batch_size": 64}})
    assert train(spec, tmp_path).status == "succeeded"
    model = torchyard.load_model(tmp_path)
    x = np.random.default_rng(0).normal(size=(20, 30)) * 100 + 50
    proba = model.predict_proba(x)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.tensor(x, dtype=torch.float32))[:, 0]).double().numpy()
    np.testing.assert_allclose(proba, np.stack([1 - p, p], axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (model.predict(x) == (p > 0.5).astype(int)).all()  # numeric labels come back as the integers
    assert model.predict(x).dtype.kind == "i"


def test_a_regression_on_a_text_target_is_refused_naming_the_column(tmp_path):
    spec = parse_spec({**IRIS_SPEC, "task": "regression",
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]}})
    with pytest.raises(SpecError) as refused:
        train(spec, tmp_path)
    assert refused.value.problems[0].path == "data.target"
    assert "'regression' needs numbers" in refused.value.problems[0].message


def test_text_in_a_feature_column_is_refused_naming_the_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,colour,shade,label\n1,red,dark,x\n2,blue,light,y\n")
    spec = parse_spec({**IRIS_SPEC, "data": {"source": "file", "path": str(path), "target": "label"},
                       "model": {"layers": [{"type": "Linear", "out_features": 2}]}})
    with pytest.raises(SpecError) as refused:
        train(spec, tmp_path / "out")
    message = refused.value.problems[0].message
    assert "line 2, column 'colour': 'red' is not a number" in message
    assert "feature columns holding text: 'colour', 'shade'" in message


def test_a_numeric_label_csv_trains_the_same_bytes_as_the_same_arrays(tmp_path):
    # A CSV whose labels are numbers is read as before the text labels came: the same weights, byte for byte,
    # as an NPZ of the very values.
    X, y = IRIS.data, IRIS.target
    csv_path, npz_path = tmp_path / "iris.csv", tmp_path / "iris.npz"
    lines = [",".join([*(repr(float(v)) for v in row), str(int(t))]) + "\n" for row, t in zip(X, y, strict=True)]
    csv_path.write_text("a,b,c,d,y\n" + "".join(lines))
    np.savez(npz_path, X=X, y=y)
    spec = {**IRIS_SPEC, "training": {"epochs": 3, "batch_size": 16}}
    from_csv = train(parse_spec({**spec, "data": {**spec["data"], "path": str(csv_path), "target": "y"}}),
                     tmp_path / "csv")
    from_npz = train(parse_spec({**spec, "data": {**spec["data"], "path": str(npz_path), "target": None}}),
                     tmp_path / "npz")
    assert from_csv.weights_path.read_bytes() == from_npz.weights_path.read_bytes()
    assert json.loads(from_csv.card_path.read_text())["classes"] == [0, 1, 2]


# --- predict: shapes, standardization, feature counts ----------------------------------------------


def test_flat_rows_are_reshaped_to_the_image_shape_of_a_cnn(tmp_path):
    spec = parse_spec({"seed": 0, "task": "multiclass",
                       "data": {"source": "sklearn", "name": "load_digits", "image_shape": [1, 8, 8],
                                "standardize": True, "validation_split": 0.2},
                       "model": {"layers": [{"type": "Conv2d", "out_channels": 4, "kernel_size": 3},
                                            {"type": "ReLU"}, {"type": "Flatten"},
                                            {"type": "Linear", "out_features": 10}]},
                       "optimizer": {"type": "Adam", "lr": 0.01}, "training": {"epochs": 3, "batch_size": 64}})
    assert train(spec, tmp_path).status == "succeeded"
    model = torchyard.load_model(tmp_path)
    X, y = load_digits(return_X_y=True)
    flat = model.predict(X)  # rows of 64 values
    images = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)
    with torch.no_grad():
        assert (flat == model(images).argmax(dim=1).numpy()).all()
    assert (model.predict(X.reshape(-1, 1, 8, 8)) == flat).all()  # already shaped: taken as it is
    assert (model.predict(X.reshape(-1, 8, 8)) == flat).all()  # images without their one channel
    assert (model.predict(X[0].reshape(8, 8)) == flat[:1]).all()  # one of them
    assert (flat == y).mean() > 0.8
    with pytest.raises(ValueError, match=r"each row needs 64 features \(reshaped to \[1, 8, 8\]\).*got rows of 63"):
        model.predict(X[:, :63])


def test_predict_applies_the_standardization_fitted_on_the_training_part(tmp_path):
    spec = parse_spec({"seed": 2, "task": "regression",
                       "data": {"source": "sklearn", "name": "load_diabetes", "standardize": True,
                                "validation_split": 0.25},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]},
                       "optimizer": {"type": "Adam", "lr": 0.1}, "training": {"epochs": 3, "batch_size": 32}})
    assert train(spec, tmp_path).status == "succeeded"
    model = torchyard.load_model(tmp_path)
    from sklearn.datasets import load_diabetes
    X = load_diabetes().data
    train_rows, _ = split_indices(len(X), 0.25, 2)
    part = X[train_rows].astype(np.float32)
    mean, std = part.mean(axis=0), part.std(axis=0)
    linear = model.body[0]
    expected = ((X - mean) / std) @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    predicted = model.predict(X)
    assert predicted.shape == (len(X),) and predicted.dtype == np.float64
    np.testing.assert_allclose(predicted, expected[:, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="predict_proba is for classifiers"):
        model.predict_proba(X)


@pytest.mark.parametrize(("rows", "message"), [
    ([[1.0, 2.0, 3.0]], "each row needs 4 features, as the model was trained on; got rows of 3"),
    ([1.0, 2.0, 3.0, 4.0, 5.0], "got rows of 5"),
    ([["a", "b", "c", "d"]], "X must be rows of 4 numbers"),
    ([[1.0, 2.0], [1.0, 2.0, 3.0]], "X must be rows of 4 numbers"),
])
def test_wrong_rows_are_a_clear_error(iris_model, rows, message):
    with pytest.raises(ValueError, match=message):
        torchyard.load_model(iris_model).predict(rows)


# --- bundles -----------------------------------------------------------------------------------------


def tarball(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def model_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (WEIGHTS, CARD, METRICS)}


def test_a_bundle_tarball_loads_as_it_is_and_unpacked_as_a_folder(iris_model, tmp_path):
    bundle = tarball(tmp_path / "job.tar.gz", model_files(iris_model))
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    x = IRIS.data[::7]
    expected = torchyard.load_model(iris_model).predict_proba(x)
    assert (torchyard.load_model(bundle).predict_proba(x) == expected).all()
    assert (torchyard.load_model(unpacked).predict_proba(x) == expected).all()
    # A bundle under one folder (as they were served before, or made with `tar czf m.tar.gz model/`) too.
    foldered = tarball(tmp_path / "old.tar.gz", {f"job_x/{k}": v for k, v in model_files(iris_model).items()})
    assert (torchyard.load_model(foldered).predict_proba(x) == expected).all()


@pytest.mark.parametrize(("members", "links", "message"), [
    ({"../evil.txt": b"x"}, {}, "climbs out"),
    ({"/etc/evil": b"x"}, {}, "absolute"),
    ({"a/b/model.json": b"{}"}, {}, "unexpected member 'a/b/model.json'"),
    ({"run.sh": b"rm -rf /"}, {}, "unexpected member 'run.sh'"),
    ({}, {"model.json": "/etc/passwd"}, "unexpected member 'model.json'"),
    ({"model.json": b"{}"}, {}, "lacks weights.safetensors"),
    ({"a/model.json": b"{}", "b/weights.safetensors": b""}, {}, "more than one folder"),
])
def test_a_hostile_bundle_is_refused_and_writes_nothing(iris_model, tmp_path, monkeypatch, members, links, message):
    alone = message in ("lacks weights.safetensors", "more than one folder")
    files = members if alone else {**model_files(iris_model), **members}
    bundle = tarball(tmp_path / "hostile.tar.gz", files, links)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(BundleError, match=message):
        torchyard.load_model(bundle)
    assert list(work.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_an_oversized_member_is_refused_by_its_declared_size(tmp_path, monkeypatch):
    import torchyard.bundle
    monkeypatch.setitem(torchyard.bundle.MAX_BYTES, CARD, 10)
    bundle = tarball(tmp_path / "big.tar.gz", {CARD: b"{" + b" " * 20 + b"}", WEIGHTS: b""})
    with pytest.raises(BundleError, match="model.json' is 22 bytes; at most 10"):
        torchyard.load_model(bundle)


def test_the_cli_predicts_from_a_folder_and_a_bundle_with_a_header_and_without(iris_model, tmp_path):
    bundle = tarball(tmp_path / "m.tar.gz", model_files(iris_model))
    printed = cli("predict", str(iris_model), "--input", str(IRIS_CSV))  # header and the label column
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 150 and (np.array(lines) == SPECIES).mean() > 0.9
    headerless = tmp_path / "rows.csv"
    headerless.write_text("".join(",".join(repr(float(v)) for v in row) + "\n" for row in IRIS.data))
    written = cli("predict", str(bundle), "--input", str(headerless), "--output", str(tmp_path / "p.csv"), "--proba")
    assert written.returncode == 0, written.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "setosa,versicolor,virginica" and len(rows) == 151
    np.testing.assert_allclose([sum(map(float, row.split(","))) for row in rows[1:]], 1.0)
    # Columns found by name, whatever their order in the file.
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("species,petal_width,sepal_length,petal_length,sepal_width\n" + "".join(
        f"?,{r[3]!r},{r[0]!r},{r[2]!r},{r[1]!r}\n" for r in IRIS.data.tolist()))
    assert cli("predict", str(iris_model), "--input", str(shuffled)).stdout.splitlines() == lines
    wrong = cli("predict", str(iris_model), "--input", str(EXAMPLES / "data" / "moons.csv"))
    assert wrong.returncode == 1 and "the header lacks 'sepal_length'" in wrong.stderr
    assert "the model takes 4 features" in wrong.stderr


# --- over the service --------------------------------------------------------------------------------


@pytest.fixture
def http_client(embedded_service):
    """The embedded deployment (one real worker) served over real HTTP; yields (service, client)."""
    token = embedded_service.headers["Authorization"].removeprefix("Bearer ")
    with served(embedded_service.app) as url:
        yield embedded_service, Client(url, token)


def test_string_labels_end_to_end_upload_train_download_predict(http_client, tmp_path):
    service, client = http_client
    dataset = client.upload_dataset(IRIS_CSV, target="species")
    assert (dataset["n_rows"], dataset["n_features"], dataset["n_classes"]) == (150, 4, 3)
    spec = {**IRIS_SPEC, "data": {"source": "dataset", "dataset_id": dataset["id"], "validation_split": 0.2,
                                  "standardize": True}}
    with pytest.raises(ApiError) as refused:  # the species are no regression target
        client.submit({**spec, "task": "regression", "model": {"layers": [{"type": "Linear", "out_features": 1}]}})
    assert refused.value.status == 422
    assert refused.value.problem["errors"][0]["path"] == "data.target"
    assert "'species'" in refused.value.problem["errors"][0]["message"]

    job = client.wait(client.submit(spec)["id"], timeout=120)
    assert job["status"] == "succeeded", service.log()
    env = {**os.environ, "TORCHYARD_URL": client.base.removesuffix("/api/v1"), "TORCHYARD_TOKEN": client.token,
           "TORCHYARD_HOME": str(tmp_path / "client-home")}
    predicted = cli("predict", job["id"], "--input", str(IRIS_CSV), env=env)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == 150 and set(lines) <= {"setosa", "versicolor", "virginica"}
    assert (np.array(lines) == SPECIES).mean() > 0.9
    # `torchyard download` gives a folder load_model reads, predicting the same.
    assert cli("download", job["id"], "--out", str(tmp_path / "model"), env=env).returncode == 0
    assert list(torchyard.load_model(tmp_path / "model").predict(IRIS.data)) == lines


def test_an_upload_with_text_in_a_feature_column_is_refused_naming_it(http_client, tmp_path):
    _service, client = http_client
    path = tmp_path / "bad.csv"
    path.write_text("height,colour,label\n1.5,red,a\n1.7,blue,b\n")
    with pytest.raises(ApiError) as refused:
        client.upload_dataset(path)
    assert refused.value.status == 422
    error = refused.value.problem["errors"][0]
    assert error["path"] == "file" and "feature columns holding text: 'colour'" in error["message"]


def test_a_job_naming_another_target_of_a_text_labelled_upload_is_refused(http_client):
    _service, client = http_client
    dataset = client.upload_dataset(IRIS_CSV)  # the last column, species, is the target
    spec = {**IRIS_SPEC, "task": "regression", "model": {"layers": [{"type": "Linear", "out_features": 1}]},
            "data": {"source": "dataset", "dataset_id": dataset["id"], "target": "petal_width"}}
    with pytest.raises(ApiError) as refused:
        client.submit(spec)
    assert refused.value.status == 422
    assert "'species'" in refused.value.problem["errors"][0]["message"]
    assert "features must be numbers" in refused.value.problem["errors"][0]["message"]


def test_the_bundle_reader_knows_the_files_the_engine_writes():
    # torchyard.bundle is standard library only (the client uses it), so it names the files itself.
    import torchyard.bundle

    assert (torchyard.bundle.WEIGHTS, torchyard.bundle.CARD, torchyard.bundle.METRICS) == (WEIGHTS, CARD, METRICS)


# --- what a cold tester found: every data source, clean errors, hostile files, non-finite input ----------


@pytest.fixture(scope="module")
def circles_model(tmp_path_factory) -> Path:
    """A binary model trained on scikit-learn data, whose spec names no target column."""
    out = tmp_path_factory.mktemp("circles")
    spec = parse_spec({"seed": 0, "task": "binary",
                       "data": {"source": "sklearn", "name": "make_circles", "params": {"n_samples": 200}},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]},
                       "optimizer": {"type": "Adam", "lr": 0.05}, "training": {"epochs": 2, "batch_size": 64}})
    assert train(spec, out).status == "succeeded"
    return out


def one_error_line(result) -> str:
    """The CLI's message for a refused command: exit 1, one line `Error: ...`, no traceback."""
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_a_model_of_scikit_learn_data_predicts_a_csv_with_a_header(circles_model, tmp_path):
    rows = tmp_path / "c.csv"
    rows.write_text("x1,x2\n0.1,-0.2\n1.0,0.5\n")
    printed = cli("predict", str(circles_model), "--input", str(rows))
    assert printed.returncode == 0, printed.stderr
    expected = torchyard.load_model(circles_model).predict([[0.1, -0.2], [1.0, 0.5]])
    assert printed.stdout.splitlines() == [str(label) for label in expected]


def test_a_header_with_a_label_column_a_model_of_scikit_learn_data_cant_name_is_said_plainly(circles_model, tmp_path):
    rows = tmp_path / "c.csv"
    rows.write_text("x0,x1,target\n0.1,-0.2,1\n")
    line = one_error_line(cli("predict", str(circles_model), "--input", str(rows)))
    assert "the header names 3 columns besides any label; the model takes 2 features" in line
    assert "no column names to pick them by" in line


def test_probabilities_printed_to_the_terminal_have_the_classes_as_a_header(circles_model, tmp_path):
    rows = tmp_path / "c.csv"
    rows.write_text("0.1,-0.2\n")
    printed = cli("predict", str(circles_model), "--input", str(rows), "--proba")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0] == "0,1" and len(lines) == 2
    np.testing.assert_allclose(sum(map(float, lines[1].split(","))), 1.0)


def test_an_output_that_cant_be_written_is_one_error_line(iris_model, tmp_path):
    missing = tmp_path / "no" / "such" / "p.csv"
    line = one_error_line(cli("predict", str(iris_model), "--input", str(IRIS_CSV), "--output", str(missing)))
    assert f"can't write {missing}" in line and "No such file or directory" in line


@pytest.mark.parametrize(("text", "message"), [
    ("sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,nan\n",
     "line 2, column 'petal_width': nan is not a finite number"),
    ("5.1,3.5,1.4,0.2\n\n5.1,1e999,1.4,0.2\n", "line 3, column 2: inf is not a finite number"),
    ("sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,abc,0.2\n",
     "line 2, column 'petal_length': 'abc' is not a number"),
    ("species,sepal_length,sepal_width,petal_length,petal_width\nx,5.1,3.5,1.4,0.2\nx,5.1,1_0,1.4,0.2\n",
     "line 3, column 'sepal_width': '1_0' is not a number"),
])
def test_a_cell_that_isnt_a_finite_number_is_named_by_line_and_column(iris_model, tmp_path, text, message):
    rows = tmp_path / "rows.csv"
    rows.write_text(text)
    assert message in one_error_line(cli("predict", str(iris_model), "--input", str(rows)))


def test_input_that_isnt_utf8_is_said_to_be_so(iris_model, tmp_path):
    rows = tmp_path / "latin.csv"
    rows.write_bytes("caf\u00e9,b,c,d\n1,2,3,4\n".encode("latin-1"))
    assert f"{rows} isn't UTF-8 text" in one_error_line(cli("predict", str(iris_model), "--input", str(rows)))


@pytest.mark.parametrize("source", ["/nonexistent", "runs/iris", "model.tar.gz", "iris"])
def test_a_missing_path_is_said_missing_not_asked_of_the_service(iris_model, source, tmp_path):
    # No TORCHYARD_URL: asking the service would be a different error (no service, or 404).
    env = {**os.environ, "TORCHYARD_URL": "http://127.0.0.1:9", "TORCHYARD_HOME": str(tmp_path)}
    line = one_error_line(cli("predict", source, "--input", str(IRIS_CSV), env=env))
    assert f"no model folder or bundle file at {source}" in line


def test_non_finite_rows_are_refused_by_the_python_api_naming_row_and_column(iris_model):
    model = torchyard.load_model(iris_model)
    with pytest.raises(ValueError, match="X row 0, column 3 is nan"):
        model.predict([[1, 2, 3, float("nan")]])
    with pytest.raises(ValueError, match="X row 1, column 0 is inf"):
        model.predict_proba([[1, 2, 3, 4], [float("inf"), 2, 3, 4]])


@pytest.mark.parametrize("X", [None, 3.0, "abc"])
def test_x_that_isnt_rows_is_said_to_need_rows_of_numbers(iris_model, X):
    with pytest.raises(ValueError, match="X must be rows of 4 numbers"):
        torchyard.load_model(iris_model).predict(X)


def test_a_one_feature_model_says_feature_in_the_singular(tmp_path):
    spec = parse_spec({"seed": 0, "task": "regression",
                       "data": {"source": "sklearn", "name": "make_regression",
                                "params": {"n_samples": 50, "n_features": 1}},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]},
                       "optimizer": {"type": "SGD", "lr": 0.01}, "training": {"epochs": 1, "batch_size": 50}})
    assert train(spec, tmp_path).status == "succeeded"
    with pytest.raises(ValueError, match="each row needs 1 feature, as the model was trained on; got rows of 2"):
        torchyard.load_model(tmp_path).predict([[1.0, 2.0]])


def broken_bundle(iris_model: Path, tmp_path: Path, **changes: bytes) -> Path:
    return tarball(tmp_path / "broken.tar.gz", {**model_files(iris_model), **changes})


def test_weights_larger_than_the_card_s_network_are_refused_before_they_are_read(iris_model, tmp_path):
    # The weights member first, 20 MB of zeros (20 kB packed): refused by its declared size, whatever the order.
    zeros = tarball(tmp_path / "zeros.tar.gz", {WEIGHTS: bytes(20_000_000), CARD: (iris_model / CARD).read_bytes()})
    with pytest.raises(BundleError, match=r"^\S+zeros.tar.gz: 'weights.safetensors' is 20000000 bytes; at most "
                                          r"\d{5,6} \(what the network of model.json needs\)$"):
        torchyard.load_model(zeros)
    # A header that declares 2 GiB and no body at all: refused from the header, never read.
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        card = (iris_model / CARD).read_bytes()
        info = tarfile.TarInfo(CARD)
        info.size = len(card)
        tar.addfile(info, io.BytesIO(card))
        info = tarfile.TarInfo(WEIGHTS)
        info.size = 2 * 1024**3
        tar.fileobj.write(info.tobuf())
    with pytest.raises(BundleError, match="'weights.safetensors' is 2147483648 bytes; at most"):
        torchyard.load_model(bomb)
    # In a folder, the file's size on disk.
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / CARD).write_bytes(card)
    (tmp_path / "folder" / WEIGHTS).write_bytes(bytes(20_000_000))
    with pytest.raises(ValueError, match="weights.safetensors: 20000000 bytes, more than the"):
        torchyard.load_model(tmp_path / "folder")


def test_a_card_that_doesnt_match_its_weights_is_a_clear_error(iris_model, tmp_path):
    card = json.loads((iris_model / CARD).read_text())
    card["spec"]["model"]["layers"][0]["out_features"] = 8
    bundle = broken_bundle(iris_model, tmp_path, **{CARD: json.dumps(card).encode()})
    with pytest.raises(ValueError, match=r"weights.safetensors doesn't match the network of model.json: "
                                         r"'body.0.weight' is F32 \[16, 4\]; the card's network has F32 \[8, 4\]"):
        torchyard.load_model(bundle)
    line = one_error_line(cli("predict", str(bundle), "--input", str(IRIS_CSV)))
    assert f"{bundle}: weights.safetensors doesn't match" in line


@pytest.mark.parametrize(("changes", "message"), [
    ({CARD: b"{not json"}, "model.json: not JSON"),
    ({CARD: b'{"format": "other"}'}, "model.json: not a torchyard model card"),
    ({WEIGHTS: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"}, "weights.safetensors: not a safetensors file "
                                                                      r"\(its header isn't JSON\)"),
    ({WEIGHTS: b"\xff" * 8 + b"{}"}, r"weights.safetensors: not a safetensors file \(its header claims"),
    ({WEIGHTS: b"abc"}, r"weights.safetensors: not a safetensors file \(3 bytes\)"),
])
def test_a_corrupt_card_or_weights_is_an_error_naming_the_file(iris_model, tmp_path, changes, message):
    bundle = broken_bundle(iris_model, tmp_path, **changes)
    with pytest.raises(ValueError, match=f"^{bundle}: {message}"):
        torchyard.load_model(bundle)
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in {**model_files(iris_model), **changes}.items():
        (folder / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"^{folder}/{message}"):
        torchyard.load_model(folder)
