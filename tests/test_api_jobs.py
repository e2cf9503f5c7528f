"""The jobs resource, on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from private_servers import free_port
from sqlalchemy import event, func, insert, select

from api.epoch_rows import METRICS_PAGE
from models.tables import EpochMetrics, Job

JOBS = "/api/v1/jobs"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """Every test here runs on both backends."""
    return request.getfixturevalue(f"{request.param}_url")


def count_jobs(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


def submit(client, headers, spec, **kwargs):
    return client.post(JOBS, json=spec, headers=headers, **kwargs)


def test_requests_without_a_valid_key_are_401_problems(client, tokens, spec):
    wrong = ({}, {"Authorization": "Bearer ty_not-a-key"}, {"Authorization": f"Basic {tokens['alice']}"})
    for headers in wrong:
        response = client.get(JOBS, headers=headers)
        assert response.status_code == 401
        assert response.mimetype == "application/problem+json"
        assert response.json["status"] == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert submit(client, {}, spec).status_code == 401


def test_submit_stores_the_job_then_rings_its_queue(client, alice, spec, published, live_worker):
    response = submit(client, alice, spec)
    assert response.status_code == 201
    job = response.json
    assert job["status"] == "queued"
    assert job["progress"] == {"epoch": 0, "epochs": 5}
    assert job["queue"] == "cpu"
    assert job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["spec"]["optimizer"]["lr"] == 0.1
    assert job["spec"]["checkpoint"] == {"every_n_epochs": 1, "keep_last": 2}  # defaults filled in
    assert response.headers["Location"] == f"{JOBS}/{job['id']}"
    assert job["links"]["weights"] == f"{JOBS}/{job['id']}/weights"
    assert published == [(job["id"], "cpu")]
    assert client.get(f"{JOBS}/{job['id']}", headers=alice).json == job


def test_a_submit_counts_its_quotas_and_finds_its_slot_in_one_read_after_the_lock(app, client, alice, spec, published,
                                                                                  live_worker):
    statements = []
    engine = app.extensions["torchyard"].engine

    def record(_conn, _cursor, statement, *_args):
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        job = submit(client, alice, spec).json
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert published == [(job["id"], "cpu")]  # the free slot was found: it went with its insert
    lock = next(i for i, text in enumerate(statements) if text.startswith("SELECT users.id"))
    first_write = next(i for i, text in enumerate(statements) if text.startswith("INSERT"))
    assert len(statements[lock + 1:first_write]) == 1


def test_a_cuda_job_goes_to_the_gpu_queue(client, alice, spec, published, live_worker):
    spec["resources"] = {"device": "cuda"}
    job = submit(client, alice, spec).json
    assert job["queue"] == "gpu"
    assert published == [(job["id"], "gpu")]


def test_a_broker_that_is_down_still_gets_a_201_and_keeps_the_queued_job(make_app, alice, spec, caplog, live_worker):
    # The real publisher, aimed at a port where no Redis listens: it tries a few times, logs, and gives up,
    # since the dispatcher publishes released jobs again that no worker took.
    client = make_app(publisher=None, broker_url=f"redis://127.0.0.1:{free_port()}/0").test_client()
    with caplog.at_level(logging.WARNING, logger="models.broker"):
        response = submit(client, alice, spec)
    assert response.status_code == 201
    assert client.get(f"{JOBS}/{response.json['id']}", headers=alice).json["status"] == "queued"
    assert f"could not publish job {response.json['id']} to queue cpu" in caplog.text
    assert "the dispatcher will publish it again" in caplog.text


def test_a_bad_spec_is_422_naming_the_field_and_writes_no_row(client, alice, spec, sessions, published):
    spec["model"]["layers"][2]["out_features"] = 0
    spec["optimizer"]["type"] = "Adamm"
    response = submit(client, alice, spec)
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    paths = {error["path"]: error["message"] for error in response.json["errors"]}
    assert "model.layers[2].out_features" in paths
    assert "'Adam'" in paths["optimizer.type"]
    assert count_jobs(sessions) == 0
    assert published == []


def test_a_network_that_does_not_fit_its_data_is_422(client, alice, spec, sessions):
    spec["model"]["layers"][2]["out_features"] = 3  # binary needs one logit
    response = submit(client, alice, spec)
    assert response.status_code == 422
    assert [e["path"] for e in response.json["errors"]] == ["model.layers[2]"]
    assert count_jobs(sessions) == 0


def test_a_file_source_is_refused_at_data_source(client, alice, spec, sessions):
    spec["data"] = {"source": "file", "path": "/etc/passwd", "target": "y"}
    response = submit(client, alice, spec)
    assert response.status_code == 422
    assert [e["path"] for e in response.json["errors"]] == ["data.source"]
    assert count_jobs(sessions) == 0


def test_malformed_or_non_json_bodies_are_problems(client, alice):
    broken = client.post(JOBS, data='{"name": ', headers=alice, content_type="application/json")
    assert broken.status_code == 400
    assert broken.mimetype == "application/problem+json"
    assert "malformed JSON" in broken.json["detail"]
    assert client.post(JOBS, data="name=x", headers=alice).status_code == 415
    not_an_object = client.post(JOBS, json=[1, 2], headers=alice)
    assert not_an_object.status_code == 422


def test_an_idempotency_key_returns_the_first_job(client, alice, bob, spec, sessions, published, live_worker):
    first = submit(client, {**alice, "Idempotency-Key": "run-1"}, spec)
    again = submit(client, {**alice, "Idempotency-Key": "run-1"}, spec)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json["id"] == first.json["id"]
    assert len(published) == 1
    # The key is the caller's own: another user with the same key gets a job of their own.
    other = submit(client, {**bob, "Idempotency-Key": "run-1"}, spec)
    assert other.status_code == 201 and other.json["id"] != first.json["id"]
    spec["seed"] = 1
    reused = submit(client, {**alice, "Idempotency-Key": "run-1"}, spec)
    assert reused.status_code == 422
    assert count_jobs(sessions) == 2


def test_an_idempotency_key_matches_a_job_stored_before_a_spec_field_was_added(client, alice, spec, sessions):
    first = submit(client, {**alice, "Idempotency-Key": "before-upgrade"}, spec)
    with sessions() as session:  # as an older release stored it: without the fields added since
        job = session.get(Job, first.json["id"])
        job.spec = {name: value for name, value in job.spec.items() if name not in ("tags", "experiment")}
        session.commit()
    again = submit(client, {**alice, "Idempotency-Key": "before-upgrade"}, spec)
    assert (again.status_code, again.json["id"]) == (200, first.json["id"])
    changed = submit(client, {**alice, "Idempotency-Key": "before-upgrade"}, {**spec, "seed": 99})
    assert changed.status_code == 422
    assert count_jobs(sessions) == 1


def test_listing_pages_newest_first_with_a_cursor(client, alice, bob, spec):
    made = [submit(client, alice, {**spec, "name": f"job-{i}"}).json["id"] for i in range(7)]
    submit(client, bob, spec)
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get(JOBS, query_string=query, headers=alice).json
        pages += 1
        seen += [job["id"] for job in page["jobs"]]
        assert "spec" not in page["jobs"][0]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == made[::-1]


def test_a_page_after_a_cursor_starts_at_the_cursor_in_the_index_instead_of_filtering_newer_jobs(app, client,
                                                                                                  alice):
    from api.pagination import encode_cursor
    from models.tables import utcnow

    engine = app.extensions["torchyard"].engine
    lists = []

    def record(_conn, _cursor, statement, parameters, *_args):
        if "FROM jobs JOIN users" in statement:
            lists.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        query = {"cursor": encode_cursor(utcnow(), "job_x")}
        assert client.get(JOBS, query_string=query, headers=alice).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)
    [(statement, parameters)] = lists
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(row[-1] for row in rows)
            assert "USING INDEX ix_jobs_user_id_created_at_id (user_id=? AND (created_at,id)<(?,?))" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # no sort: the index is in the list's order
            return
        connection.exec_driver_sql("SET enable_seqscan = off")  # the table is empty: ask how a large one is read
        plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    assert "ROW(created_at, (id)::text) <" in plan.split("Index Cond:", 1)[1].split("\n")[0], plan
    assert "Filter" not in plan and "Sort" not in plan, plan


def test_a_job_and_a_list_are_written_as_their_response_models_would_write_them(client, alice, spec, set_job):
    # The presenters build plain dicts (no validation a request): the bytes must be the models' own.
    from api.schemas import JobList, JobOut

    job_id = submit(client, alice, spec).json["id"]
    set_job(job_id, status="succeeded", epoch=5, best_metric="val_loss", best_value=1, best_epoch=4,
            final_metrics={"loss": 0.25}, started_at=dt.datetime(2027, 1, 2, 3, 4, 5, 6))
    one = client.get(f"{JOBS}/{job_id}", headers=alice).data
    assert one == JobOut.model_validate_json(one).model_dump_json().encode()
    assert b'"value":1.0' in one and b'"started_at":"2027-01-02T03:04:05.000006Z"' in one
    page = client.get(JOBS, headers=alice).data
    assert page == JobList.model_validate_json(page).model_dump_json().encode()
    assert json.loads(page)["jobs"][0] == {k: v for k, v in json.loads(one).items() if k != "spec"}


def test_listing_filters_by_status_and_checks_its_arguments(client, alice, spec, set_job):
    first, second = (submit(client, alice, spec).json["id"] for _ in range(2))
    set_job(first, status="succeeded")
    queued = client.get(JOBS, query_string={"status": "queued"}, headers=alice).json["jobs"]
    assert [job["id"] for job in queued] == [second]
    for query, path in (({"status": "done"}, "status"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                        ({"cursor": "garbage"}, "cursor")):
        response = client.get(JOBS, query_string=query, headers=alice)
        assert response.status_code == 422
        assert response.json["errors"][0]["path"] == path


def test_metrics_since_an_epoch_come_in_order(client, alice, spec, sessions, set_job):
    job_id = submit(client, alice, spec).json["id"]
    set_job(job_id, status="running", epoch=3, attempts=1)
    with sessions() as session:
        for epoch in (3, 1, 2):
            session.add(EpochMetrics(job_id=job_id, epoch=epoch, attempt=1, values={"loss": 1.0 / epoch}))
        session.commit()
    everything = client.get(f"{JOBS}/{job_id}/metrics", headers=alice).json
    assert everything["status"] == "running"
    assert [row["epoch"] for row in everything["metrics"]] == [1, 2, 3]
    assert everything["metrics"][1] == {"epoch": 2, "loss": 0.5}
    later = client.get(f"{JOBS}/{job_id}/metrics", query_string={"since_epoch": 1}, headers=alice).json
    assert [row["epoch"] for row in later["metrics"]] == [2, 3]


def add_epochs(sessions, job_id: str, epochs) -> None:
    with sessions() as session:
        session.execute(insert(EpochMetrics), [dict(job_id=job_id, epoch=epoch, attempt=1, values={"loss": 1 / epoch})
                                               for epoch in epochs])
        session.commit()


def test_metrics_come_a_page_at_a_time_in_order_with_no_gap_or_repeat(client, alice, spec, sessions):
    job_id = submit(client, alice, spec).json["id"]
    add_epochs(sessions, job_id, range(1, 2501))
    pages, since = [], 0
    while since is not None:
        page = client.get(f"{JOBS}/{job_id}/metrics", query_string={"since_epoch": since}, headers=alice).json
        pages.append([row["epoch"] for row in page["metrics"]])
        since = page["next_since_epoch"]
    assert [len(epochs) for epochs in pages] == [METRICS_PAGE, METRICS_PAGE, 500]
    assert [epoch for epochs in pages for epoch in epochs] == list(range(1, 2501))
    last = client.get(f"{JOBS}/{job_id}/metrics?since_epoch=2500", headers=alice).json
    assert (last["metrics"], last["next_since_epoch"]) == ([], None)


def test_max_points_picks_evenly_by_position_across_a_gap_in_the_epochs_keeping_the_first_and_last(
        client, alice, spec, sessions):
    job_id = submit(client, alice, spec).json["id"]
    add_epochs(sessions, job_id, [*range(1, 101), *range(201, 301)])  # 200 rows; epochs 101-200 missing

    def sampled(query: str) -> list[int]:
        answer = client.get(f"{JOBS}/{job_id}/metrics?{query}", headers=alice).json
        assert answer["next_since_epoch"] is None
        return [row["epoch"] for row in answer["metrics"]]

    # Positions 0, 50, 100, 149, 199 of the 200 rows (api.downsample.evenly): row 100 is epoch 201.
    assert sampled("max_points=5") == [1, 51, 201, 250, 300]
    assert sampled("since_epoch=50&max_points=3") == [51, 226, 300]  # of the 150 rows after epoch 50
    assert sampled("since_epoch=290&max_points=20") == list(range(291, 301))  # fewer rows than points: all


@pytest.mark.parametrize("query, name", [
    ("max_points=1", "max_points"), (f"max_points={METRICS_PAGE + 1}", "max_points"), ("max_points=x", "max_points"),
    ("since_epoch=-1", "since_epoch")])
def test_a_bad_metrics_query_is_422_naming_the_argument(client, alice, spec, query, name):
    job_id = submit(client, alice, spec).json["id"]
    response = client.get(f"{JOBS}/{job_id}/metrics?{query}", headers=alice)
    assert response.status_code == 422
    assert response.json["errors"][0]["path"] == name


def test_cancelling_a_queued_job_is_immediate(client, alice, spec):
    job_id = submit(client, alice, spec).json["id"]
    response = client.post(f"{JOBS}/{job_id}/cancel", headers=alice)
    assert response.status_code == 200
    assert response.json["status"] == "cancelled"
    assert response.json["stop_reason"] == "cancelled"
    assert response.json["finished_at"] is not None
    again = client.post(f"{JOBS}/{job_id}/cancel", headers=alice)
    assert again.status_code == 409
    assert again.mimetype == "application/problem+json"


def test_cancelling_a_running_job_asks_it_to_stop(client, alice, spec, set_job):
    job_id = submit(client, alice, spec).json["id"]
    set_job(job_id, status="running", attempts=1, worker_id="w1")
    response = client.post(f"{JOBS}/{job_id}/cancel", headers=alice)
    assert response.status_code == 202
    assert response.json["status"] == "running"
    assert response.json["cancel_requested"] is True


def test_deleting_a_finished_job_removes_its_rows_and_files(client, alice, spec, set_job, add_artifact, store,
                                                            sessions):
    job_id = submit(client, alice, spec).json["id"]
    assert client.delete(f"{JOBS}/{job_id}", headers=alice).status_code == 409  # still queued
    weights = add_artifact(job_id, "weights", "weights.safetensors", b"w" * 10)
    checkpoint = add_artifact(job_id, "checkpoint", "checkpoints/epoch-0001.pt", b"c" * 10, epoch=1)
    set_job(job_id, status="succeeded")
    assert store.exists(weights.uri) and store.exists(checkpoint.uri)
    assert client.delete(f"{JOBS}/{job_id}", headers=alice).status_code == 204
    assert not store.exists(weights.uri) and not store.exists(checkpoint.uri)
    assert not store.exists(f"jobs/{job_id}")
    assert client.get(f"{JOBS}/{job_id}", headers=alice).status_code == 404
    assert count_jobs(sessions) == 0


def test_another_users_job_is_404_everywhere(client, alice, bob, spec, set_job, add_artifact):
    job_id = submit(client, alice, spec).json["id"]
    add_artifact(job_id, "weights", "weights.safetensors", b"w")
    add_artifact(job_id, "checkpoint", "checkpoints/epoch-0001.pt", b"c", epoch=1)
    for method, path in (("get", ""), ("get", "/metrics"), ("get", "/weights"), ("get", "/checkpoints"),
                         ("get", "/checkpoints/1"), ("post", "/cancel"), ("delete", "")):
        response = getattr(client, method)(f"{JOBS}/{job_id}{path}", headers=bob)
        assert response.status_code == 404, path
        assert response.json["detail"] == f"no job {job_id!r}"
    assert client.get(JOBS, headers=bob).json["jobs"] == []
    set_job(job_id, status="succeeded")
    assert client.delete(f"{JOBS}/{job_id}", headers=bob).status_code == 404
    assert client.get(f"{JOBS}/{job_id}", headers=alice).json["status"] == "succeeded"


@pytest.mark.parametrize("path, query, name", [
    ("/jobs", "status=queued&status=failed", "status"),
    ("/jobs", "experiment=a&experiment=b", "experiment"),
    ("/jobs", "limit=1&limit=2", "limit"),
    ("/jobs/{id}/metrics", "max_points=5&max_points=7", "max_points"),
    ("/jobs/{id}/metrics", "stream=0&stream=1", "stream"),
    ("/jobs/{id}/logs", "format=text&format=json", "format"),
    ("/jobs/{id}/logs", "since_seq=1&since_seq=2", "since_seq"),
    ("/jobs/{id}/weights", "format=bundle&format=x", "format"),
    ("/datasets", "cursor=a&cursor=b", "cursor"),
    ("/tags", "limit=5&limit=5", "limit"),
    ("/audit", "action=submit&action=cancel", "action"),
])
def test_a_single_valued_query_argument_given_twice_is_422_naming_it(client, alice, admin, spec, path, query, name):
    job_id = submit(client, alice, spec).json["id"]
    headers = admin if path == "/audit" else alice
    response = client.get(f"/api/v1{path.format(id=job_id)}?{query}", headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json["errors"] == [{"path": name, "message": "given 2 times; it takes one value"}]


def test_a_repeated_tag_still_asks_for_jobs_carrying_each(client, alice, spec):
    submit(client, alice, {**spec, "name": "both", "tags": ["a", "b"]})
    submit(client, alice, {**spec, "name": "one", "tags": ["a"]})
    found = client.get(f"{JOBS}?tag=a&tag=b", headers=alice).json["jobs"]
    assert [job["name"] for job in found] == ["both"]
