"""Hostile input at every endpoint, on SQLite and on PostgreSQL: each probe gets a 4xx problem+json that
names the field (or the limit), a short answer (no echo of a 10 KB value), and writes nothing: no row
changed, no file in the artifact store, nothing published.

The probes share one deployment per database (a finished job with metrics and files, a queued job, a
dataset); the snapshot taken before and after each probe is what "nothing written" means.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import POSTGRES_ADMIN_URL, RecordingPublisher, _admin_connection
from hostile_probes import API, CSV, MAX_ANSWER_BYTES, PROBES, multipart, names
from specs import circles_spec
from sqlalchemy import select
from sqlalchemy.engine import make_url

from models.tables import Artifact, Dataset, EpochMetrics, Job

PROBLEM = "application/problem+json"


@contextlib.contextmanager
def database(kind: str, home: Path):
    """A fresh database of this kind (SQLAlchemy URL), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{home / 'torchyard.db'}"
        return
    name = f"torchyard_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class World:
    """A deployment with rows to aim at: alice's finished job (metrics, weights, a checkpoint), her queued
    job and her dataset."""

    client: object
    headers: dict
    sessions: object
    store: object
    published: list
    ids: dict


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory):
    from api import create_app
    from api.auth import create_api_key
    from migrations.apply import upgrade

    home = tmp_path_factory.mktemp(request.param)
    with database(request.param, home) as url:
        upgrade(url)
        publisher = RecordingPublisher()
        app = create_app({"TESTING": True, "database_url": url, "artifacts_url": str(home / "artifacts"),
                          "broker_url": "filesystem://"}, publisher)
        services = app.extensions["torchyard"]
        with services.sessions() as session:
            headers = {"Authorization": f"Bearer {create_api_key(session, 'alice', 'test')}"}
        client = app.test_client()
        finished, queued = (client.post(f"{API}/jobs", json=circles_spec(), headers=headers).json["id"]
                            for _ in range(2))
        with services.sessions() as session:
            session.add(EpochMetrics(job_id=finished, epoch=1, attempt=1, values={"loss": 0.5}))
            for kind, name, epoch in (("weights", "weights.safetensors", None), ("checkpoint", "c-0001.pt", 1)):
                uri, size, sha256 = services.store.put_bytes(b"w" * 10, f"jobs/{finished}/{name}")
                session.add(Artifact(job_id=finished, kind=kind, name=name, uri=uri, size=size, sha256=sha256,
                                     epoch=epoch))
            session.get(Job, finished).status = "succeeded"
            session.commit()
        dataset = client.post(f"{API}/datasets", data=multipart("d.csv", CSV)[0], headers=headers,
                              content_type=multipart("d.csv", CSV)[1])
        assert dataset.status_code == 201, dataset.json
        ids = {"job": finished, "queued": queued, "dataset": dataset.json["id"]}
        yield World(client, headers, services.sessions, services.store, publisher.published, ids)
        services.engine.dispose()


def snapshot(world: World) -> dict:
    """Everything a request could have written: rows (with the columns a cancel or delete changes), stored
    files, published messages."""
    with world.sessions() as session:
        rows = {
            "jobs": session.execute(select(Job.id, Job.status, Job.cancel_requested).order_by(Job.id)).all(),
            "datasets": session.scalars(select(Dataset.id).order_by(Dataset.id)).all(),
            "artifacts": session.scalars(select(Artifact.id).order_by(Artifact.id)).all(),
            "metrics": session.execute(select(EpochMetrics.job_id, EpochMetrics.epoch)).all(),
        }
    files = sorted(str(p) for p in Path(world.store.root).rglob("*") if p.is_file())
    return {**rows, "files": files, "published": list(world.published)}


def test_the_table_covers_every_endpoint_with_forty_probes_or_more():
    assert len(PROBES) >= 40
    assert len({probe.name for probe in PROBES}) == len(PROBES)


@pytest.mark.parametrize("probe", PROBES, ids=[probe.name for probe in PROBES])
def test_a_hostile_request_is_a_short_4xx_problem_naming_the_field_and_writes_nothing(world, probe):
    before = snapshot(world)
    response = world.client.open(
        probe.path.format(**world.ids),
        method=probe.method,
        data=probe.body,
        content_type=probe.content_type if probe.body is not None else None,
        headers={**world.headers, **probe.headers},
    )
    assert response.status_code == probe.status, response.data[:500]
    assert response.mimetype == PROBLEM
    assert len(response.data) <= MAX_ANSWER_BYTES, response.data[:500]
    problem = response.json
    assert problem["status"] == probe.status
    if probe.names is not None:
        assert names(problem, probe.names), problem
    assert snapshot(world) == before


# --- what only looks hostile is accepted -----------------------------------------------------------


def test_brackets_inside_strings_a_bom_and_any_script_are_accepted(client, alice, spec, sessions, published,
                                                                  live_worker):
    spec["name"] = "[" * 60 + "{ジョブ 🚀 \\\" ]" + "}" * 60  # brackets in a string don't nest anything
    body = b"\xef\xbb\xbf" + json.dumps(spec).encode()  # a UTF-8 byte order mark
    response = client.post(f"{API}/jobs", data=body, headers=alice, content_type="application/json; charset=utf-8")
    assert response.status_code == 201, response.json
    with sessions() as session:
        assert session.get(Job, response.json["id"]).name == spec["name"]
    assert [job_id for job_id, _ in published] == [response.json["id"]]


def test_the_spec_limits_are_settings(make_app, alice, spec):
    client = make_app(max_spec_bytes=1024, max_json_depth=8).test_client()
    assert client.post(f"{API}/jobs", json=spec, headers=alice).status_code == 201
    padded = json.dumps(spec, indent=40)  # the same spec, past 1024 bytes
    too_large = client.post(f"{API}/jobs", data=padded, headers=alice, content_type="application/json")
    assert too_large.status_code == 413
    assert too_large.json["detail"] == "the spec is larger than 1024 bytes (max_spec_bytes)"
    too_deep = client.post(f"{API}/jobs", data="[" * 9 + "]" * 9, headers=alice, content_type="application/json")
    assert too_deep.status_code == 422
    assert too_deep.json["errors"] == [{"path": "", "message": "nested deeper than 8 levels (max_json_depth)"}]


# --- the JSON gate's scan and rules ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "depth"), [
    ('"[[[["', 0),
    ('["\\"[", []]', 2),
    ('{"a": "\\\\", "b": [[1]]}', 3),
    ('{"a": "]]]]", "b": [[{"c": "[["}]]}', 4),
    ('["never closed', 1),
    ('["ends in a backslash\\', 1),
    ("[" * 100_000 + "]" * 100_000, 100_000),
    ('[}]{', 1),
])
def test_nesting_is_counted_outside_strings_and_without_recursion(text, depth):
    from api.gate import nesting_depth

    assert nesting_depth(text) == depth


def test_a_json_value_is_checked_at_every_path_without_recursion():
    from api.gate import JsonRefused, loads

    text = '{"a": {"b": [1, {"c": NaN}], "b2": 1e999}, "d": [' + "9" * 30 + '], "e": {"k": 1, "k": 2}}'
    with pytest.raises(JsonRefused) as refused:
        loads(text, max_depth=32)
    assert refused.value.status == 422
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("a.b[1].c", "must be a finite number, not nan"),
        ("a.b2", "must be a finite number, not inf"),
        ("d[0]", "must be a whole number from -2^63 to 2^63 - 1"),
        ("e.k", "this key appears more than once"),
    ]
    assert loads(json.dumps({"max": 2**63 - 1, "min": -(2**63)}), max_depth=1) == {"max": 2**63 - 1, "min": -(2**63)}


# --- small ones: no weights, 204, 404 ----------------------------------------------------------------


def test_a_job_that_ended_without_weights_says_so_and_a_queued_one_says_not_yet(client, alice, spec, set_job):
    job_id = client.post(f"{API}/jobs", json=spec, headers=alice).json["id"]
    queued = client.get(f"{API}/jobs/{job_id}/weights", headers=alice)
    assert queued.status_code == 409
    assert queued.json["detail"] == (f"job {job_id} has no weights yet: it is queued, and they are stored when "
                                     "it succeeds")
    set_job(job_id, status="failed", error="the worker's device ran out of memory")
    failed = client.get(f"{API}/jobs/{job_id}/weights?format=bundle", headers=alice)
    assert failed.status_code == 404
    assert failed.json["type"] == "/problems/no-weights"
    assert failed.json["detail"] == f"job {job_id} failed without weights: the worker's device ran out of memory"


def test_a_204_has_no_body_and_no_content_type(client, alice, spec, set_job):
    job_id = client.post(f"{API}/jobs", json=spec, headers=alice).json["id"]
    set_job(job_id, status="cancelled")
    dataset_id = client.post(f"{API}/datasets", data=multipart("d.csv", CSV)[0], headers=alice,
                             content_type=multipart("d.csv", CSV)[1]).json["id"]
    for path in (f"/jobs/{job_id}", f"/datasets/{dataset_id}"):
        response = client.delete(API + path, headers=alice)
        assert response.status_code == 204
        assert response.data == b""
        assert "Content-Type" not in response.headers, path


def test_a_404_names_a_huge_id_by_its_start_and_length(client, alice):
    response = client.get(f"{API}/jobs/{'a' * 10_000}", headers=alice)
    assert response.status_code == 404
    assert response.json["detail"] == f"no job {'a' * 60!r}… (10000 characters)"


def test_a_spec_sent_in_small_chunks_over_http_is_read_whole(live_server, tokens, spec):
    body = json.dumps(spec, indent=2000).encode()  # a valid spec of some 200 KB
    assert len(body) > 100_000

    def chunks():  # Transfer-Encoding: chunked, no Content-Length; each read of the body gets one chunk
        yield from (body[start:start + 1000] for start in range(0, len(body), 1000))

    response = requests.post(f"{live_server}{API}/jobs", data=chunks(), timeout=30,
                             headers={"Authorization": f"Bearer {tokens['alice']}",
                                      "Content-Type": "application/json"})
    assert response.status_code == 201, response.text


def test_a_chunked_spec_past_the_limit_is_413(client, alice):
    body = b" " * (1024 * 1024) + b"{}"  # no Content-Length: the limit is found by reading one byte past it
    response = client.post(f"{API}/jobs", input_stream=io.BytesIO(body), headers=alice,
                           content_type="application/json", environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert response.json["detail"] == "the spec is larger than 1048576 bytes (max_spec_bytes)"


class Trickle(io.RawIOBase):
    """A request body the way a slow socket hands it over: at most 1000 bytes a read."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.data.seek(offset, whence)

    def tell(self) -> int:
        return self.data.tell()

    def readinto(self, buffer) -> int:
        chunk = self.data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_a_spec_that_trickles_in_is_read_whole(client, alice, spec):
    body = json.dumps(spec, indent=200).encode()
    response = client.post(f"{API}/jobs", input_stream=Trickle(body), content_length=len(body), headers=alice,
                           content_type="application/json")
    assert response.status_code == 201, response.json
