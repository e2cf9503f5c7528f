"""Health, the OpenAPI document, workers, and errors as problem+json."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

from models.tables import Job, Worker, utcnow

API = "/api/v1"


def test_the_api_package_never_imports_torch():
    code = ("import sys, api; from api import create_app; import api.jobs, api.artifacts, api.datasets; "
            "assert 'torch' not in sys.modules, 'api imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_health_checks_the_database(client):
    response = client.get(f"{API}/health")
    assert response.status_code == 200
    checks = {"database": "ok", "broker": "skipped (filesystem transport)"}
    assert response.json == {"status": "ok", "checks": checks}


def test_health_checks_a_redis_broker(make_app):
    up = make_app(broker_url="redis://127.0.0.1:6379/0")
    response = up.test_client().get(f"{API}/health")
    assert response.status_code == 200, response.json
    assert response.json["checks"]["broker"] == "ok"
    down = make_app(broker_url="redis://127.0.0.1:1/0")
    response = down.test_client().get(f"{API}/health")
    assert response.status_code == 503
    assert response.json["status"] == "error"
    assert response.json["checks"]["broker"].startswith("error: ")


def test_the_openapi_document_describes_the_api(client):
    document = client.get(f"{API}/openapi.json").json
    assert document["openapi"].startswith("3.1")
    assert {f"{API}/jobs", f"{API}/jobs/{{job_id}}/weights", f"{API}/datasets", f"{API}/health"} <= set(
        document["paths"])
    schemas = document["components"]["schemas"]
    assert {"JobSpec", "JobOut", "JobList", "ProblemOut", "DatasetOut"} <= set(schemas)
    assert "model" in schemas["JobSpec"]["properties"]
    submit = document["paths"][f"{API}/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSpec"}
    # Every reference resolves inside the document.
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_workers_lists_live_ones_with_their_jobs_naming_only_the_caller_s(client, alice, bob, spec, sessions):
    alices = client.post(f"{API}/jobs", json=spec, headers=alice).json["id"]
    bobs = client.post(f"{API}/jobs", json=spec, headers=bob).json["id"]
    now = utcnow()
    with sessions() as session:
        session.add_all([
            Worker(id="w-live", hostname="gpu-1", queues="gpu,cpu", devices={"cuda": 4}, slots=4,
                   last_heartbeat_at=now),
            Worker(id="w-dead", hostname="gpu-2", queues="gpu",
                   last_heartbeat_at=now - dt.timedelta(hours=1)),
        ])
        for job_id in (alices, bobs):  # a worker with several slots runs several jobs at once
            session.get(Job, job_id).status, session.get(Job, job_id).worker_id = "running", "w-live"
        session.commit()

    workers = client.get(f"{API}/workers", headers=alice).json["workers"]
    assert [(w["id"], w["queues"], w["slots"], w["running"], w["free_slots"], w["job_ids"]) for w in workers] == [
        ("w-live", ["gpu", "cpu"], 4, 2, 2, [alices])]
    assert client.get(f"{API}/workers", headers=bob).json["workers"][0]["job_ids"] == [bobs]
    assert client.get(f"{API}/workers").status_code == 401


def test_unknown_paths_and_methods_are_problems(client, alice):
    missing = client.get(f"{API}/nothing-here", headers=alice)
    assert missing.status_code == 404
    assert missing.mimetype == "application/problem+json"
    assert missing.json["type"] == "about:blank"
    assert missing.json["title"] == "Not Found"
    wrong_method = client.put(f"{API}/jobs", headers=alice)
    assert wrong_method.status_code == 405
    assert wrong_method.mimetype == "application/problem+json"
    assert "POST" in wrong_method.headers["Allow"]


def test_an_unexpected_error_is_a_500_problem_without_a_trace(make_app, caplog):
    app = make_app()

    def boom():
        raise RuntimeError("secret internal detail")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert b"secret internal detail" not in response.data
    assert b"Traceback" not in response.data
    assert "secret internal detail" in caplog.text  # but the log has it
