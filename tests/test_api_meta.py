"""Health, the OpenAPI document, workers, and errors as problem+json."""

from __future__ import annotations

import datetime as dt
import inspect
import re
import subprocess
import sys
from pathlib import Path

from flask import Blueprint
from werkzeug.exceptions import HTTPException

from api.auth import require_user
from api.openapi import DETAILS, openapi_document
from models.tables import Job, User, Worker, utcnow

API = "/api/v1"


def test_the_api_package_never_imports_torch():
    code = ("import sys, api; from api import create_app; import api.jobs, api.artifacts, api.datasets; "
            "assert 'torch' not in sys.modules, 'api imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_health_checks_the_database(client):
    response = client.get(f"{API}/health")
    assert response.status_code == 200
    checks = {"database": "ok", "broker": "skipped (filesystem transport)", "workers": "ok",
              "rate_limits": "skipped (counted in this process's memory: one API process)"}
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


def test_the_openapi_document_describes_the_api(app, client):
    document = client.get(f"{API}/openapi.json").json
    # The served document is the app's; the fuzz test reads the same one without an app.
    assert document == openapi_document(app)
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]
    assert {"JobSpec", "JobOut", "JobList", "ProblemOut", "DatasetOut"} <= set(schemas)
    assert "model" in schemas["JobSpec"]["properties"]
    submit = document["paths"][f"{API}/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSpec"}
    weights = document["paths"][f"{API}/jobs/{{job_id}}/weights"]["get"]
    assert [(p["name"], p["in"]) for p in weights["parameters"]] == [("job_id", "path"), ("format", "query")]
    assert set(weights["responses"]) == {"200", "401", "404", "409", "422", "429"}  # 429: past a rate limit
    health = document["paths"][f"{API}/health"]["get"]
    assert health["security"] == []
    assert "429" not in health["responses"]  # a probe is never rate-limited
    assert "security" not in submit  # the document's default: an API key
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


def api_routes(app) -> set[tuple[str, str]]:
    """(endpoint, method) of each rule in the url map under the API prefix, HEAD and OPTIONS aside."""
    return {
        (rule.endpoint, method)
        for rule in app.url_map.iter_rules() if rule.rule.startswith(f"{API}/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def routed(app, document) -> tuple[set[tuple[str, str]], set[str]]:
    """(endpoint, method) that the url map routes each documented operation to, with a 1 in each {parameter};
    and the operations it routes nowhere, or elsewhere than their operationId and path parameters say."""
    urls = app.url_map.bind("localhost")
    found, wrong = set(), set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            try:
                endpoint, args = urls.match(re.sub(r"{\w+}", "1", path), method.upper())
            except HTTPException:  # not found, method not allowed
                wrong.add(f"{label}: not in the url map")
                continue
            params = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            if (endpoint, set(args)) != (operation["operationId"], params):
                wrong.add(f"{label}: documented as {operation['operationId']} {params}, routed to {endpoint} {args}")
            found.add((endpoint, method.upper()))
    return found, wrong


def disagreements(app, document) -> set[str]:
    """Where the document and the app's API routes differ, both ways, and where the details table does."""
    routes = api_routes(app)
    documented, wrong = routed(app, document)
    endpoints = {endpoint for endpoint, _ in routes}
    return (
        wrong
        | {f"{method} {endpoint}: not in the document" for endpoint, method in routes - documented}
        | {f"{endpoint}: no details" for endpoint in endpoints - DETAILS.keys()}
        | {f"{endpoint}: details of no endpoint" for endpoint in DETAILS.keys() - endpoints}
    )


def test_the_document_has_each_api_route_with_exactly_its_methods_and_nothing_else(app):
    assert disagreements(app, openapi_document(app)) == set()


def test_a_route_added_without_documentation_is_caught_and_its_operation_derived(make_app):
    app = make_app()
    before = openapi_document(app)
    extra = Blueprint("extra", __name__, url_prefix=f"{API}/extra")
    extra.before_request(require_user)

    @extra.put("/things/<int:thing_id>")
    def replace_thing(thing_id: int):
        """Replace a thing.

        The old one is gone."""

    app.register_blueprint(extra)
    assert disagreements(app, before) == {
        "PUT extra.replace_thing: not in the document", "extra.replace_thing: no details"}
    after = openapi_document(app)
    assert disagreements(app, after) == {"extra.replace_thing: no details"}
    operation = after["paths"][f"{API}/extra/things/{{thing_id}}"]["put"]
    assert operation["operationId"] == "extra.replace_thing"
    assert operation["tags"] == ["extra"]
    assert (operation["summary"], operation["description"]) == ("Replace a thing.", "The old one is gone.")
    assert [(p["name"], p["in"], p["schema"]["type"]) for p in operation["parameters"]] == [
        ("thing_id", "path", "integer")]
    # An API key asked for, a path naming a row, a rate limit.
    assert set(operation["responses"]) == {"401", "404", "429"}
    assert "security" not in operation


def test_each_operation_s_summary_is_its_view_s_docstring_first_line(app):
    operations = [op for item in openapi_document(app)["paths"].values() for op in item.values()]
    assert operations
    for operation in operations:
        docstring = inspect.getdoc(app.view_functions[operation["operationId"]])
        assert docstring, f"{operation['operationId']} has no docstring"
        assert operation["summary"] == docstring.splitlines()[0]


def test_workers_shows_a_user_counts_per_queue_and_an_admin_each_live_worker_with_its_jobs(
        client, alice, bob, spec, sessions):
    alices = client.post(f"{API}/jobs", json=spec, headers=alice).json["id"]
    bobs = client.post(f"{API}/jobs", json=spec, headers=bob).json["id"]
    now = utcnow()
    with sessions() as session:
        session.add_all([
            Worker(id="gpu-1:41", hostname="gpu-1", queues="gpu,cpu", devices={"cpu": 32, "cuda": 4}, slots=4,
                   last_heartbeat_at=now),
            Worker(id="cpu-1:7", hostname="cpu-1", queues="cpu", devices={"cpu": 8, "cuda": 0}, slots=1,
                   last_heartbeat_at=now),
            Worker(id="gpu-2:9", hostname="gpu-2", queues="gpu", last_heartbeat_at=now - dt.timedelta(hours=1)),
        ])
        for job_id in (alices, bobs):  # a worker with several slots runs several jobs at once
            session.get(Job, job_id).status, session.get(Job, job_id).worker_id = "running", "gpu-1:41"
        session.get(User, session.get(Job, bobs).user_id).role = "admin"
        session.commit()

    counted = client.get(f"{API}/workers", headers=alice)
    assert counted.json == {"live_workers": 2, "workers": None, "queues": [
        {"queue": "cpu", "workers": 2, "slots": 5, "free_slots": 3, "devices": ["cpu", "cuda"]},
        {"queue": "gpu", "workers": 1, "slots": 4, "free_slots": 2, "devices": ["cpu", "cuda"]}]}
    assert not {"gpu-1", "cpu-1", "41", alices, bobs} & set(re.findall(r"[\w-]+", counted.get_data(as_text=True)))
    detail = client.get(f"{API}/workers", headers=bob).json
    assert detail["queues"] == counted.json["queues"]
    assert [(w["id"], w["hostname"], w["queues"], w["slots"], w["running"], w["free_slots"], w["job_ids"])
            for w in detail["workers"]] == [("cpu-1:7", "cpu-1", ["cpu"], 1, 0, 1, []),
                                            ("gpu-1:41", "gpu-1", ["gpu", "cpu"], 4, 2, 2, [alices, bobs])]
    assert client.get(f"{API}/workers").status_code == 401


def test_unknown_paths_and_methods_are_problems(client, alice):
    missing = client.get(f"{API}/nothing-here", headers=alice)
    assert missing.status_code == 404
    assert missing.mimetype == "application/problem+json"
    assert missing.json["type"] == "/problems/not-found"
    assert missing.json["title"] == "Not Found"
    wrong_method = client.put(f"{API}/jobs", headers=alice)
    assert wrong_method.status_code == 405
    assert wrong_method.mimetype == "application/problem+json"
    assert wrong_method.json["type"] == "/problems/method-not-allowed"
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


def test_every_answer_says_nosniff_and_only_the_dashboard_s_carry_its_policy(client, alice):
    answers = {
        "json": client.get(f"{API}/jobs", headers=alice),
        "problem 401": client.get(f"{API}/jobs"),
        "problem 404": client.get(f"{API}/nothing-here", headers=alice),
        "problem 405": client.put(f"{API}/jobs", headers=alice),
        "problem 422": client.get(f"{API}/jobs?limit=0", headers=alice),
        "no content": client.options(f"{API}/jobs"),
        "openapi": client.get(f"{API}/openapi.json"),
        "metrics 403": client.get("/metrics", headers=alice),
        "unrouted": client.get("/nothing-here"),
    }
    for what, response in answers.items():
        assert response.headers.get("X-Content-Type-Options") == "nosniff", what
        assert "Content-Security-Policy" not in response.headers, what
    page = client.get("/")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")


def test_the_api_s_url_answers_with_an_index_of_its_parts_to_anyone(client, alice, admin, spec):
    job_id = client.post(f"{API}/jobs", json=spec, headers=alice).json["id"]
    answers = [client.get(url, headers=headers) for url in (API, f"{API}/")
               for headers in ({}, alice, {"Authorization": "Bearer ty_not-a-key"})]
    assert {(response.status_code, response.headers.get("Location")) for response in answers} == {(200, None)}
    index = answers[0].json
    assert all(response.json == index for response in answers)
    assert (index["name"], index["api_version"]) == ("torchyard", "v1")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", index["version"])
    assert index["links"] == {
        "dashboard": "/", "docs": "/docs", "openapi": f"{API}/openapi.json", "health": f"{API}/health",
        "jobs": f"{API}/jobs", "datasets": f"{API}/datasets", "tags": f"{API}/tags", "workers": f"{API}/workers",
        "me": f"{API}/me", "audit": f"{API}/audit"}
    for link in index["links"].values():
        assert client.get(link, headers=admin).status_code == 200, link
    # Nothing of anyone's: no job, no user, no key.
    text = answers[1].get_data(as_text=True)
    assert not [secret for secret in (job_id, "alice", "root", "ty_") if secret in text]
