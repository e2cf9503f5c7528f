"""Uploads are read exactly as they were checked, by the reader the engine trains with, in bounded memory and
a few at a time per user; a hostile file or form field is a 4xx problem naming the field, and nothing is
stored. The API tests run on SQLite and on PostgreSQL."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from sqlalchemy import func, select

from api.errors import ApiError
from api.upload_slots import upload_slot
from api.uploads import UploadError
from api.uploads import read_csv as api_read_csv
from api.uploads import read_npz as api_read_npz
from models.spec import SpecError
from models.tables import Dataset, User
from worker.engine.data import read_csv as engine_read_csv
from worker.engine.data import read_npz as engine_read_npz

DATASETS = "/api/v1/datasets"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """The API tests here run on both backends."""
    return request.getfixturevalue(f"{request.param}_url")


def upload(client, headers, content: bytes, filename: str, **form):
    return client.post(DATASETS, data={"file": (io.BytesIO(content), filename), **form}, headers=headers,
                       content_type="multipart/form-data")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz(*members: tuple[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of exactly these members, in this order (a repeated name too, as a hostile writer may)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compression) as archive:
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, and writes it all the same
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def lying_npy(shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npy header claiming ``shape`` (float64) followed by ``data``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def corrupted(content: bytes, inside: bytes) -> bytes:
    """``content`` with the last byte of ``inside`` (stored uncompressed in it) changed: a CRC mismatch."""
    at = content.index(inside) + len(inside) - 1
    return content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1 :]


SMALL_X, SMALL_Y = np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0])
VALID = [("X.npy", npy(SMALL_X)), ("y.npy", npy(SMALL_Y))]
WIDE = 10_001  # one past the default max_columns


# (probe, file content, filename, other form fields, the path the 422 names, part of its message)
HOSTILE = [
    # np.load(...)["X"] would read the member "X", not the "X.npy" whose header was checked.
    ("npz: plain X and y beside X.npy and y.npy", npz(*VALID, ("X", npy(np.ones((1000, 100)))),
                                                      ("y", npy(np.ones(1000)))), "d.npz", {}, "file",
     "exactly the arrays X and y"),
    ("npz: X.npy twice", npz(*VALID, ("X.npy", npy(np.ones((4, 2))))), "d.npz", {}, "file", "lists 3 members"),
    ("npz: a third member", npz(*VALID, ("z.npy", npy(np.ones(4)))), "d.npz", {}, "file", "lists 3 members"),
    ("npz: a header that claims more than its data", npz(("X.npy", lying_npy((100_000, 1000), b"\0" * 16)),
                                                          VALID[1]), "d.npz", {}, "X", "its header"),
    ("npz: a CRC mismatch", corrupted(npz(*VALID), npy(SMALL_Y)), "d.npz", {}, "file", "can't be read"),
    ("npz: NaN in X", npz(("X.npy", npy(np.array([[1.0, np.nan]] * 4))), VALID[1]), "d.npz", {}, "X", "NaN"),
    ("npz: no rows", npz(("X.npy", npy(np.zeros((0, 2)))), ("y.npy", npy(np.zeros(0)))), "d.npz", {}, "X",
     "at least one sample"),
    ("npz: a complex y", npz(VALID[0], ("y.npy", npy(SMALL_Y.astype(complex)))), "d.npz", {}, "y", "numeric"),
    ("filename with NUL", b"a,b\n1,0\n", "d\x00.csv", {}, "file", "control character"),
    ("filename of 300 characters", b"a,b\n1,0\n", "d" * 296 + ".csv", {}, "file", "at most 200 characters"),
    ("name with NUL", b"a,b\n1,0\n", "d.csv", {"name": "my\x00data"}, "name", "control character"),
    ("name of 201 characters", b"a,b\n1,0\n", "d.csv", {"name": "n" * 201}, "name", "at most 200 characters"),
    ("target with NUL", b"a,b\n1,0\n", "d.csv", {"target": "b\x00"}, "target", "control character"),
    ("target of 10,000 characters", b"a,b\n1,0\n", "d.csv", {"target": "t" * 10_000}, "target", "at most 200"),
    ("column name of 250 characters", f"a,{'b' * 250}\n1,0\n".encode(), "d.csv", {}, "file",
     "column 2 of the header"),
    ("column name with an escape", b"a,b\x1b[31m\n1,0\n", "d.csv", {}, "file", "column 2 of the header"),
    ("columns past max_columns", (",".join(f"c{i}" for i in range(WIDE)) + "\n" + ",".join(["0"] * WIDE))
     .encode(), "d.csv", {}, "file", f"{WIDE} columns; at most 10000 (max_columns)"),
    ("a line past its length bound", b"a,b\n1," + b"1" * 500 + b"\n", "d.csv", {}, "file",
     "line 2 is longer than 400 characters (at most 100 a column, plus 200 for a text label)"),
    ("not UTF-8", b"a,b\n\xff\xfe,1\n", "d.csv", {}, "file", "UTF-8"),
    ("a number with an underscore", b"a,b\n1_000,1\n", "d.csv", {}, "file", "'1_000' is not a number"),
    ("infinity", b"a,b\n1e400,1\n", "d.csv", {}, "file", "finite"),
    ("a value beyond float32", b"a,b\n1,0\n-1e300,1\n", "d.csv", {}, "file",
     "line 3, column 'a': -1e+300 is not a finite number within float32's range"),
    ("npz: X beyond float32", npz(("X.npy", npy(np.array([[1.0, 4e38]] * 4))), VALID[1]), "d.npz", {}, "X",
     "within float32's range"),
    ("npz: y beyond float32", npz(VALID[0], ("y.npy", npy(np.array([0.0, 1.0, 1e39, 1.0])))), "d.npz", {}, "y",
     "y holds 1e+39; values must be finite numbers within float32's range"),
    ("npz: a negative size in a header", npz(("X.npy", lying_npy((-4, 2), b"")), VALID[1]), "d.npz", {}, "X",
     "sizes can't be negative"),
]


@pytest.mark.parametrize(("content", "filename", "form", "path", "message"),
                         [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_a_hostile_upload_is_a_422_naming_the_field_and_stores_nothing(
    client, alice, sessions, artifacts_url, content, filename, form, path, message
):
    response = upload(client, alice, content, filename, **form)
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    assert response.json["errors"][0]["path"] == path
    assert message in response.json["errors"][0]["message"]
    assert len(response.data) < 2000  # a 10 KB field is never echoed back whole
    assert stored_files(artifacts_url) == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def stored_files(artifacts_url: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(artifacts_url) for name in names]


def test_arrays_that_unpack_past_their_limit_are_refused_before_they_are_read(make_app, tokens, artifacts_url):
    client = make_app(max_upload_bytes=10_000).test_client()  # the arrays may unpack to 20 × 10,000 bytes
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    # Each array alone is within the limit; together they are past it.
    x, y = npy(np.zeros((100, 230))), npy(np.zeros((100, 30)))
    response = upload(client, headers, npz(("X.npy", x), ("y.npy", y), compression=zipfile.ZIP_DEFLATED), "z.npz")
    assert response.status_code == 422
    assert response.json["errors"][0] == {
        "path": "file", "message": f"the arrays unpack to {len(x) + len(y)} bytes; at most 200000 are allowed"}
    assert stored_files(artifacts_url) == []


def test_a_csv_header_with_spaces_names_the_columns_without_them(client, alice):
    dataset = upload(client, alice, b"a, b, label\n1, 2, 0\n3, 4, 1\n", "d.csv", target="label").json
    assert (dataset["columns"], dataset["target"], dataset["n_classes"]) == (["a", "b", "label"], "label", 2)


def test_a_text_label_of_the_longest_allowed_fits_a_line_of_one_feature(client, alice):
    label = "l" * 200  # client text's longest: the line bound leaves room for it whatever the columns
    dataset = upload(client, alice, f"a,label\n1,{label}\n2,other\n".encode(), "d.csv", target="label")
    assert dataset.status_code == 201, dataset.json
    assert dataset.json["n_classes"] == 2


# --- one reader: what the API accepts, the engine reads with the same columns and values ---------------


@pytest.mark.parametrize("text", [
    "a, b, label\n1, 2, 0\n3, 4, 1\n",  # spaces around names and values
    '"a","b","label"\r\n"1","2","0"\r\n3,4,1\r\n',  # quoted, CRLF
    "\ufeffa,b,label\n1,2,0\n\n   \n3,4,1",  # a byte-order mark, blank lines, no final newline
    "a,b,label\r1,2,0\r3,4,1\r",  # old Mac line endings
], ids=["spaces", "quoted-crlf", "bom-blank-lines", "cr"])
def test_the_api_and_the_engine_read_a_csv_alike(tmp_path, text):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode())
    info = api_read_csv(str(path), "label", max_rows=100, max_columns=100)
    arrays = engine_read_csv(path, "label")
    assert info.columns["names"] == [*arrays.feature_names, "label"] == ["a", "b", "label"]
    assert (info.n_rows, info.n_features, info.n_classes) == (2, 2, 2)
    assert arrays.X.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert arrays.y.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("text", [
    "a,b\noops,1\n", "a,b\n1,\n", "a,b\n1\n", "a,b\n", "a,a\n1,2\n", "a,b\n1,nan\n", "a,b\n1_0,2\n",
    f"a,{'b' * 201}\n1,2\n",
])
def test_the_api_and_the_engine_refuse_a_csv_alike(tmp_path, text):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(UploadError) as api:
        api_read_csv(str(path), None, max_rows=100, max_columns=100)
    with pytest.raises(SpecError) as engine:
        engine_read_csv(path, None)
    assert engine.value.problems[0].message == f"d.csv: {api.value}"


def test_a_bad_value_blocks_into_the_file_is_named_by_its_line(tmp_path):
    path = tmp_path / "d.csv"
    # Past the first megabyte of text, with blank lines before it: line numbers count every line.
    path.write_text("a,b\n" + "1,2\n" * 300_000 + "\n" * 5 + "oops,3\n")
    with pytest.raises(UploadError, match=r"^line 300007, column 'a': 'oops' is not a number"):
        api_read_csv(str(path), None, max_rows=10**6, max_columns=100)
    with pytest.raises(UploadError, match=r"^more than 1000 rows \(max_samples\)$"):
        api_read_csv(str(path), None, max_rows=1000, max_columns=100)


def test_the_engine_refuses_the_npz_the_api_refuses_and_reads_the_members_it_checked(tmp_path):
    hostile = tmp_path / "hostile.npz"
    hostile.write_bytes(HOSTILE[0][1])
    with pytest.raises(UploadError, match="exactly the arrays X and y"):
        api_read_npz(str(hostile), max_rows=100, max_bytes=10**6)
    with pytest.raises(SpecError, match="exactly the arrays X and y"):
        engine_read_npz(hostile)
    # Fortran order, big-endian, integers and compression all read as numpy.load reads them.
    x = np.asfortranarray(np.arange(24, dtype=">f4").reshape(4, 3, 2))
    y = np.array([0, 2, 1, 2], dtype=np.uint8)
    ok = tmp_path / "ok.npz"
    np.savez_compressed(ok, X=x, y=y)
    arrays = engine_read_npz(ok)
    assert arrays.X.dtype == x.dtype and arrays.X.tolist() == x.tolist()
    assert arrays.y.dtype == y.dtype and arrays.y.tolist() == y.tolist()
    info = api_read_npz(str(ok), max_rows=100, max_bytes=10**6)
    assert (info.n_rows, info.n_features, info.n_targets, info.n_classes) == (4, 6, 1, 3)


def test_a_big_endian_npz_the_api_accepts_trains_in_the_engine(tmp_path):
    from models.validation import parse_spec
    from worker.engine.run import train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(">f8")
    path = tmp_path / "big.npz"
    np.savez(path, X=x, y=(x[:, 0] > 0).astype(">i8"))
    assert api_read_npz(str(path), max_rows=100, max_bytes=10**6).n_classes == 2
    spec = parse_spec({"task": "binary", "data": {"source": "file", "path": str(path)},
                       "model": {"layers": [{"type": "Linear", "out_features": 1}]}, "training": {"epochs": 1}})
    assert train(spec, tmp_path / "run", device="cpu").status == "succeeded"
    multiclass = spec.model_copy(update={"task": "multiclass"})
    assert train(parse_spec({**multiclass.model_dump(mode="json"), "model": {"layers": [
        {"type": "Linear", "out_features": 2}]}}), tmp_path / "run2", device="cpu").status == "succeeded"


def test_a_csv_the_api_accepts_trains_in_the_engine_with_the_same_columns(client, alice, sessions, store, tmp_path):
    from models.validation import parse_spec
    from worker.engine.run import train

    rng = np.random.default_rng(0)
    rows = "".join(f"{a:.4f}, {b:.4f}, {int(a + b > 0)}\n" for a, b in rng.normal(size=(120, 2)))
    dataset = upload(client, alice, f"a, b, label\n{rows}".encode(), "spaces.csv").json
    assert (dataset["columns"], dataset["target"]) == (["a", "b", "label"], "label")
    body = {"name": "spaces", "task": "binary", "seed": 0, "data": {"source": "dataset", "dataset_id": dataset["id"]},
            "model": {"layers": [{"type": "Linear", "out_features": 1}]}, "training": {"epochs": 2}}
    job = client.post("/api/v1/jobs", json=body, headers=alice)
    assert job.status_code == 201, job.json
    # What a worker does with the job: fetch the stored file, train the stored spec on it.
    with sessions() as session:
        uri = session.scalar(select(Dataset.uri).where(Dataset.id == dataset["id"]))
    store.get_file(uri, str(tmp_path / "data.csv"))
    result = train(parse_spec(job.json["spec"]), tmp_path / "out", data_path=tmp_path / "data.csv")
    assert result.status == "succeeded"
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card["input_shape"] == [2]  # a and b; label is the target


# --- bounded memory -------------------------------------------------------------------------------


def test_checking_a_large_csv_upload_holds_a_fraction_of_its_size_in_memory(tmp_path):
    path, rows = tmp_path / "large.csv", 300_000
    rng = np.random.default_rng(0)
    table = np.column_stack([rng.normal(size=(rows, 10)), rng.integers(0, 3, size=rows)])
    np.savetxt(path, table, delimiter=",", fmt=["%.6f"] * 10 + ["%d"],
               header=",".join([f"x{i}" for i in range(10)] + ["label"]), comments="")
    size = path.stat().st_size  # about 29 MB
    # The API in a process of its own, the file streamed to it over HTTP: its memory before, its peak after.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "upload_memory.py"), "--measure", "upload",
                           str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 201, result["body"]
    assert json.loads(result["body"])["n_rows"] == rows
    growth = (result["after_kib"] - result["before_kib"]) * 1024
    # The reader holds about a megabyte of text at a time: the growth is the same ~13 MB for 20 MB or 100 MB
    # files. Reading a file whole took about 7 times its size; the goal is at most twice.
    assert growth < size, f"the API grew by {growth} bytes checking a {size}-byte file"


# --- concurrent uploads per user ------------------------------------------------------------------


def user_id(sessions, name: str) -> str:
    with sessions() as session:
        return session.scalar(select(User.id).where(User.name == name))


def slot_held(settings, user: str) -> bool:
    """Whether the user's one upload slot is taken (by someone else), tried the way an upload tries it."""
    try:
        with upload_slot(settings, user):
            return False
    except ApiError:
        return True


class SlowUpload:
    """A multipart upload over a real socket whose body is sent in two parts: between them, the server holds
    the request (and its upload slot) while it waits for the rest."""

    def __init__(self, port: int, token: str, content: bytes, filename: str):
        boundary = uuid.uuid4().hex
        self.body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: text/csv\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.connection.putrequest("POST", DATASETS)
        for header, value in (("Authorization", f"Bearer {token}"), ("Content-Length", str(len(self.body))),
                              ("Content-Type", f"multipart/form-data; boundary={boundary}")):
            self.connection.putheader(header, value)
        self.connection.endheaders(self.body[:10])

    def finish(self) -> tuple[int, dict]:
        self.connection.send(self.body[10:])
        response = self.connection.getresponse()
        answer = response.status, json.loads(response.read())
        self.connection.close()
        return answer


@pytest.fixture
def one_upload_app(make_app):
    """An app allowing one upload at a time per user, also served over real HTTP; (app, port)."""
    from werkzeug.serving import make_server

    app = make_app(max_concurrent_uploads=1)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, server.server_port
    server.shutdown()
    thread.join(timeout=10)


def test_an_upload_past_the_users_limit_is_a_429_until_one_finishes(one_upload_app, tokens, sessions):
    app, port = one_upload_app
    client = app.test_client()
    alice, bob = ({"Authorization": f"Bearer {tokens[name]}"} for name in ("alice", "bob"))
    first = SlowUpload(port, tokens["alice"], b"a,b\n1,0\n", "first.csv")
    settings = app.extensions["torchyard"].settings
    wait_for(lambda: slot_held(settings, user_id(sessions, "alice")), 30, "the first upload's slot")

    refused = upload(client, alice, b"a,b\n1,0\n", "second.csv")
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    assert refused.headers["Retry-After"] == "5"
    assert refused.json["type"] == "/problems/too-many-uploads"
    assert refused.json["detail"] == ("1 upload(s) of yours are in progress on this server, the most allowed at "
                                      "once (TORCHYARD_MAX_CONCURRENT_UPLOADS); retry when one has finished")
    assert upload(client, bob, b"a,b\n1,0\n", "bobs.csv").status_code == 201  # the limit is per user

    status, dataset = first.finish()
    assert (status, dataset["name"]) == (201, "first.csv")
    assert upload(client, alice, b"a,b\n1,0\n", "second.csv").status_code == 201


HOLDER = """
import sys
from api.upload_slots import upload_slot
from models.settings import Settings
with upload_slot(Settings(database_url=sys.argv[1], max_concurrent_uploads=1), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_upload_slots_are_counted_across_processes_and_freed_when_a_process_dies(make_app, tokens, sessions):
    app = make_app(max_concurrent_uploads=1)
    client = app.test_client()
    alice = {"Authorization": f"Bearer {tokens['alice']}"}
    database_url = app.extensions["torchyard"].settings.database_url
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, database_url, user_id(sessions, "alice")],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert upload(client, alice, b"a,b\n1,0\n", "d.csv").status_code == 429
    finally:
        holder.send_signal(signal.SIGKILL)  # a process that dies mid-upload: the kernel frees its slot
        holder.wait()
    assert upload(client, alice, b"a,b\n1,0\n", "d.csv").status_code == 201
