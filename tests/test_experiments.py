"""Experiments and tags: a spec names them, the API finds jobs by them, the CLI lists them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models.spec import MAX_TAGS, SpecError
from models.tables import JobTag
from models.validation import parse_spec

JOBS = "/api/v1/jobs"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """The API tests here run on both backends."""
    return request.getfixturevalue(f"{request.param}_url")


def submit(client, headers, spec, name: str, tags=(), experiment=None) -> str:
    labelled = {**spec, "name": name, "tags": list(tags), **({"experiment": experiment} if experiment else {})}
    response = client.post(JOBS, json=labelled, headers=headers)
    assert response.status_code == 201, response.json
    return response.json["id"]


def listed(client, headers, **query) -> list[str]:
    """The names of every job the listing gives for ``query``, following its cursor page by page."""
    names, cursor = [], None
    while True:
        page = {**query, **({"cursor": cursor} if cursor else {})}
        response = client.get(JOBS, query_string=page, headers=headers)
        assert response.status_code == 200, response.json
        names += [job["name"] for job in response.json["jobs"]]
        cursor = response.json["next_cursor"]
        if cursor is None:
            return names


# --- the spec ---------------------------------------------------------------------------------------------


def test_a_spec_carries_tags_and_an_experiment_the_engine_ignores(spec):
    parsed = parse_spec({**spec, "tags": ["baseline", "lr 0.1", "ü"], "experiment": "circles / sweep 1"})
    assert parsed.tags == ["baseline", "lr 0.1", "ü"]
    assert parsed.experiment == "circles / sweep 1"
    untagged = parse_spec(spec)
    assert (untagged.tags, untagged.experiment) == ([], None)


@pytest.mark.parametrize("labels, problems", [
    ({"tags": ["ok", ""]}, {"tags[1]": "at least 1 character"}),
    ({"tags": ["x" * 65]}, {"tags[0]": "at most 64 characters, not 65"}),
    ({"tags": ["a", "b\nc", "d\x00"]}, {"tags[1]": "'\\n' at position 1 is a control character",
                                         "tags[2]": "'\\x00' at position 1 is a control character"}),
    ({"tags": ["a", "b", "a"]}, {"tags[2]": "'a' is tags[0] already; a tag is given once"}),
    ({"tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}, {"tags": f"at most {MAX_TAGS} items"}),
    ({"tags": "baseline"}, {"tags": "valid list"}),
    ({"tags": [7]}, {"tags[0]": "valid string"}),
    ({"experiment": ""}, {"experiment": "at least 1 character"}),
    ({"experiment": "e" * 201}, {"experiment": "at most 200 characters, not 201"}),
    ({"experiment": "a\ud800"}, {"experiment": "valid string"}),  # pydantic refuses a lone surrogate first
    # A label is found by what it says: never blank, no spaces around it, nothing invisible in it.
    ({"tags": [" ", "\u3000"]}, {"tags[0]": "blank: only spaces", "tags[1]": "blank: only spaces"}),
    ({"tags": [" x", "x ", "\u00a0x"]}, {"tags[0]": "no spaces around it", "tags[1]": "no spaces around it",
                                         "tags[2]": "no spaces around it"}),
    ({"tags": ["bidi\u202egnp.exe"]}, {"tags[0]": "'\\u202e' at position 4 is an invisible format character"}),
    ({"experiment": " "}, {"experiment": "blank: only spaces"}),
    ({"experiment": " sweep "}, {"experiment": "no spaces around it"}),
    ({"experiment": "sw\u200deep"}, {"experiment": "'\\u200d' at position 2 is an invisible format character"}),
    # A listing joins tags with commas: a tag holding one would read as two.
    ({"tags": ["a,b"]}, {"tags[0]": "',' at position 1 is not allowed in a tag"}),
])
def test_bad_tags_and_experiments_are_refused_naming_each_by_its_path(spec, labels, problems):
    with pytest.raises(SpecError) as caught:
        parse_spec({**spec, **labels})
    found = {problem.path: problem.message for problem in caught.value.problems}
    assert found.keys() == problems.keys()
    for path, message in problems.items():
        assert message in found[path]


def test_the_api_refuses_a_bad_tag_as_a_422_naming_it_and_stores_nothing(client, alice, spec, sessions):
    response = client.post(JOBS, json={**spec, "tags": ["fine", "x" * 100]}, headers=alice)
    assert response.status_code == 422
    assert response.json["errors"] == [{"path": "tags[1]", "message": "at most 64 characters, not 100"}]
    assert client.get(JOBS, headers=alice).json["jobs"] == []


# --- the API ----------------------------------------------------------------------------------------------


def test_jobs_show_their_tags_and_experiment(client, alice, spec):
    job_id = submit(client, alice, spec, "tagged", tags=["baseline", "small"], experiment="circles")
    job = client.get(f"{JOBS}/{job_id}", headers=alice).json
    assert (job["tags"], job["experiment"]) == (["baseline", "small"], "circles")
    assert job["spec"]["tags"] == ["baseline", "small"]
    summary = client.get(JOBS, headers=alice).json["jobs"][0]
    assert (summary["tags"], summary["experiment"]) == (["baseline", "small"], "circles")
    plain = client.get(f"{JOBS}/{submit(client, alice, spec, 'plain')}", headers=alice).json
    assert (plain["tags"], plain["experiment"]) == ([], None)


def test_the_listing_finds_a_users_jobs_by_every_tag_and_experiment_page_by_page(client, alice, bob, spec):
    for i in range(7):  # a-0 … a-6, newest last
        tags = ["sweep"] + (["lr"] if i % 2 == 0 else []) + (["deep"] if i % 3 == 0 else [])
        submit(client, alice, spec, f"a-{i}", tags=tags, experiment="one" if i < 4 else "two")
    # Bob's jobs carry the same labels: none of them may ever show in Alice's listings.
    for i in range(3):
        submit(client, bob, spec, f"b-{i}", tags=["sweep", "lr", "deep"], experiment="one")

    assert listed(client, alice, tag="sweep", limit=2) == [f"a-{i}" for i in (6, 5, 4, 3, 2, 1, 0)]
    assert listed(client, alice, tag="lr", limit=2) == ["a-6", "a-4", "a-2", "a-0"]
    # Repeated: every tag, not any.
    assert listed(client, alice, tag=["lr", "deep"], limit=1) == ["a-6", "a-0"]
    assert listed(client, alice, experiment="one", limit=3) == ["a-3", "a-2", "a-1", "a-0"]
    assert listed(client, alice, experiment="two", tag="lr") == ["a-6", "a-4"]
    assert listed(client, alice, tag="missing") == []
    assert listed(client, alice, experiment="ONE") == []  # exact, as stored
    assert listed(client, bob, tag=["lr", "deep"], experiment="one", limit=2) == ["b-2", "b-1", "b-0"]


def test_the_label_filters_combine_with_the_status_filter(client, alice, spec, set_job):
    done = submit(client, alice, spec, "done", tags=["x"], experiment="e")
    submit(client, alice, spec, "waiting", tags=["x"], experiment="e")
    set_job(done, status="succeeded")
    assert listed(client, alice, tag="x", status="succeeded") == ["done"]
    assert listed(client, alice, experiment="e", status="queued") == ["waiting"]


def test_an_admin_finds_every_users_jobs_by_tag(client, alice, bob, admin, spec):
    submit(client, alice, spec, "alice's", tags=["shared"])
    submit(client, bob, spec, "bob's", tags=["shared"])
    assert listed(client, admin, tag="shared") == ["bob's", "alice's"]


@pytest.mark.parametrize("query, path, message", [
    ({"tag": ""}, "tag", "empty"),
    ({"tag": "x" * 65}, "tag", "at most 64 characters, not 65"),
    ({"tag": "a\tb"}, "tag", "control character"),
    ({"tag": [f"t{i}" for i in range(MAX_TAGS + 1)]}, "tag", f"at most {MAX_TAGS} tags"),
    ({"experiment": ""}, "experiment", "empty"),
    ({"experiment": "e" * 201}, "experiment", "at most 200 characters, not 201"),
    ({"experiment": "\x7f"}, "experiment", "control character"),
    ({"tag": " "}, "tag", "blank: only spaces"),
    ({"tag": " x "}, "tag", "no spaces around it"),
    ({"tag": "a,b"}, "tag", "',' at position 1 is not allowed in a tag"),
    ({"tag": "x\u202e"}, "tag", "invisible format character"),
    ({"experiment": " "}, "experiment", "blank: only spaces"),
    ({"experiment": "e "}, "experiment", "no spaces around it"),
    ({"experiment": "\u2067e"}, "experiment", "invisible format character"),
    ({"experiment": ["a", "b"]}, "experiment", "given 2 times; it takes one value"),
])
def test_bad_label_filters_are_422_naming_the_argument(client, alice, query, path, message):
    response = client.get(JOBS, query_string=query, headers=alice)
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    [problem] = response.json["errors"]
    assert problem["path"] == path and message in problem["message"]


def test_the_tags_endpoint_counts_the_callers_own_tags_most_used_first(client, alice, bob, spec):
    for tags in (["b", "a"], ["a"], ["c", "a", "b"]):
        submit(client, alice, spec, "j", tags=tags)
    submit(client, bob, spec, "j", tags=["bobs", "a"])
    response = client.get("/api/v1/tags", headers=alice)
    assert response.status_code == 200
    assert response.json == {"tags": [{"tag": "a", "jobs": 3}, {"tag": "b", "jobs": 2}, {"tag": "c", "jobs": 1}]}
    assert client.get("/api/v1/tags", query_string={"limit": 1}, headers=alice).json["tags"] == [
        {"tag": "a", "jobs": 3}]
    assert client.get("/api/v1/tags", query_string={"limit": 0}, headers=alice).status_code == 422
    assert client.get("/api/v1/tags").status_code == 401


def test_deleting_a_job_deletes_its_tags(client, alice, spec, sessions, set_job):
    job_id = submit(client, alice, spec, "gone", tags=["a", "b"])
    kept = submit(client, alice, spec, "kept", tags=["a"])
    set_job(job_id, status="cancelled")
    assert client.delete(f"{JOBS}/{job_id}", headers=alice).status_code == 204
    with sessions() as session:
        assert session.execute(select(JobTag.job_id, JobTag.tag)).all() == [(kept, "a")]
        assert session.scalar(select(func.count()).select_from(JobTag)) == 1


def test_the_openapi_document_lists_the_label_filters_and_the_tags_endpoint(client):
    document = client.get("/api/v1/openapi.json").json
    params = {p["name"]: p for p in document["paths"]["/api/v1/jobs"]["get"]["parameters"]}
    assert params["tag"]["schema"]["type"] == "array"
    assert params["experiment"]["schema"] == {"type": "string", "maxLength": 200}
    assert "/api/v1/tags" in document["paths"]
    summary = document["components"]["schemas"]["JobSummary"]
    assert {"tags", "experiment"} <= set(summary["required"])


# --- the CLI ----------------------------------------------------------------------------------------------


def test_the_cli_lists_jobs_with_their_experiment_and_tags_and_filters_by_them(live_server, tokens, spec, tmp_path):
    headers = {"Authorization": f"Bearer {tokens['alice']}"}

    def post(name, tags, experiment=None):
        body = {**spec, "name": name, "tags": tags, **({"experiment": experiment} if experiment else {})}
        request = urllib.request.Request(f"{live_server}{JOBS}", data=json.dumps(body).encode(),
                                         headers={**headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["id"]

    first = post("first-run", ["baseline", "small"], "circles")
    second = post("second-run", ["small"])
    env = {**os.environ, "TORCHYARD_URL": live_server, "TORCHYARD_TOKEN": tokens["alice"],
           "TORCHYARD_HOME": str(tmp_path / "client-home")}

    def cli(*args) -> list[list[str]]:
        run = subprocess.run([sys.executable, "-m", "torchyard.cli", "list", *args], capture_output=True,
                             text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        return [line.split() for line in run.stdout.splitlines()]

    everything = cli()
    assert everything[0] == ["ID", "NAME", "STATUS", "PROGRESS", "BEST", "AGE", "TAGS", "EXPERIMENT"]
    # The age ("4s ago") is two words.
    assert [row[:5] + row[7:] for row in everything[1:]] == [
        [second, "second-run", "queued", "0/5", "-", "small", "-"],
        [first, "first-run", "queued", "0/5", "-", "baseline,small", "circles"]]
    assert all(row[5].endswith("s") and row[6] == "ago" for row in everything[1:])
    assert [row[0] for row in cli("--tag", "small")[1:]] == [second, first]
    assert [row[0] for row in cli("--tag", "small", "--tag", "baseline")[1:]] == [first]
    assert [row[0] for row in cli("--experiment", "circles")[1:]] == [first]
    assert cli("--tag", "nothing-has-it") == [["no", "jobs"]]


def test_the_cli_submits_with_tags_added_to_the_spec_s_and_an_experiment_in_place_of_its_own(
        live_server, tokens, spec, tmp_path):
    env = {**os.environ, "TORCHYARD_URL": live_server, "TORCHYARD_TOKEN": tokens["alice"],
           "TORCHYARD_HOME": str(tmp_path / "client-home")}

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torchyard.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    def job(job_id: str) -> dict:
        request = urllib.request.Request(f"{live_server}{JOBS}/{job_id}",
                                         headers={"Authorization": f"Bearer {tokens['alice']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**spec, "tags": ["mine"], "experiment": "from-the-file"}))
    submitted = cli("submit", str(spec_file), "--tag", "extra", "--tag", "mine", "--tag", "extra",
                    "--experiment", "sweep")
    assert submitted.returncode == 0, submitted.stderr
    labelled = job(submitted.stdout.strip())
    assert (labelled["tags"], labelled["experiment"]) == (["mine", "extra"], "sweep")
    kept = job(cli("submit", str(spec_file)).stdout.strip())
    assert (kept["tags"], kept["experiment"]) == (["mine"], "from-the-file")

    refused = cli("submit", str(spec_file), "--tag", "a,b")
    assert refused.returncode == 1
    assert "tags[1]: ',' at position 1 is not allowed in a tag" in refused.stderr

    # The README's walk-through: the example carries the labels its `torchyard list` line filters by.
    example = cli("submit", str(Path(__file__).parent.parent / "examples" / "circles-mlp.json"))
    assert example.returncode == 0, example.stderr
    listed = cli("list", "--tag", "baseline", "--experiment", "circles")
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [example.stdout.strip()]
