"""The dashboard's server side, without a browser: its pages and files under the Content-Security-Policy, the
vendored libraries as pinned, a job's network table, and metrics downsampled for charts."""

from __future__ import annotations

import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import insert

from api.dashboard import CONTENT_SECURITY_POLICY
from api.downsample import evenly
from api.epoch_rows import METRICS_PAGE
from api.openapi import openapi_document
from api.vendor import MANIFEST, PACKAGES, VENDOR
from models.tables import EpochMetrics

STATIC = Path(__file__).resolve().parents[1] / "api" / "static"
PAGES = ("/", "/docs")
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class Assets(HTMLParser):
    """The scripts and stylesheets a page names, and what the policy would refuse to run or apply in it."""

    def __init__(self):
        super().__init__()
        self.files: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in attrs
            if "src" in attrs:
                self.files.append(attrs["src"])
        elif tag == "link" and attrs.get("rel") == "stylesheet":
            self.files.append(attrs["href"])
        elif tag == "style":
            self.inline.append("<style>")
        if "style" in attrs or any(name.startswith("on") for name in attrs):
            self.inline.append(f"<{tag}> attribute")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append("<script> body")


def page_assets(client, path: str) -> Assets:
    assets = Assets()
    assets.feed(client.get(path).get_data(as_text=True))
    return assets


@pytest.mark.parametrize("path", [*PAGES, "/static/app.css", "/static/js/main.js", "/static/no-such-file.js"])
def test_the_dashboard_s_answers_carry_the_content_security_policy(client, path):
    response = client.get(path)
    assert response.headers["Content-Security-Policy"] == POLICY == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_the_pages_need_no_key_and_the_api_still_does(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200
        assert response.mimetype == "text/html"
    assert client.get("/api/v1/jobs").status_code == 401
    assert "Content-Security-Policy" not in client.get("/api/v1/openapi.json").headers  # JSON runs nothing


@pytest.mark.parametrize("path", PAGES)
def test_every_file_a_page_names_is_served_with_its_type_and_nothing_runs_inline(client, path):
    assets = page_assets(client, path)
    assert assets.files and assets.inline == []  # the policy would block anything inline
    for url in assets.files:
        response = client.get(url)
        assert response.status_code == 200, url
        expected = "text/css" if url.endswith(".css") else ("text/javascript", "application/javascript")
        assert response.mimetype in expected, (url, response.mimetype)


def test_every_module_is_served_as_javascript_and_imports_only_served_modules(client):
    modules = sorted(STATIC.joinpath("js").rglob("*.js"))
    assert len(modules) >= 8
    for module in modules:
        url = f"/static/{module.relative_to(STATIC).as_posix()}"
        assert client.get(url).mimetype in ("text/javascript", "application/javascript"), url
        for target in re.findall(r'^import .* from "(\.[^"]+)";', module.read_text(), re.MULTILINE):
            assert module.parent.joinpath(target).resolve().is_file(), f"{url} imports {target}"


def test_the_dashboard_s_code_never_writes_markup():
    # Text a user typed reaches the page through textContent (api/static/js/dom.js); these would parse it.
    writers = re.compile(r"\.(?:inner|outer)HTML\b|insertAdjacentHTML|createContextualFragment|DOMParser|"
                         r"document\.write|\beval\(|new Function")
    for module in STATIC.joinpath("js").rglob("*.js"):
        assert not writers.findall(module.read_text()), module


def test_the_vendored_files_are_the_pinned_packages_with_their_licences():
    manifest = json.loads(MANIFEST.read_text())
    assert {name: entry["version"] for name, entry in manifest.items()} == {p.name: p.version for p in PACKAGES}
    for package in PACKAGES:
        folder = VENDOR / package.name
        files = manifest[package.name]["files"]
        assert set(files) == {Path(member).name for member in package.files} == {p.name for p in folder.iterdir()}
        assert "LICENSE" in files
        for name, digest in files.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{package.name}/{name}"


def test_the_dashboard_s_routes_are_not_in_the_openapi_document(app):
    paths = openapi_document(app)["paths"]
    assert paths and all(path.startswith("/api/v1/") for path in paths)
    assert "/api/v1/jobs/{job_id}/network" in paths


# --- metrics for charts --------------------------------------------------------------------------


@pytest.mark.parametrize("count, most", [(1, 2), (2, 2), (3, 2), (10, 3), (1000, 7), (10_000, 1000), (999, 1000)])
def test_evenly_keeps_the_first_and_the_last_and_at_most_the_count_in_order(count, most):
    rows = list(range(count))
    picked = evenly(rows, most)
    assert len(picked) == min(count, most)
    assert picked[0] == 0 and picked[-1] == count - 1
    assert picked == sorted(set(picked))
    if count > most:  # evenly spaced: no gap more than one step longer than another
        gaps = {b - a for a, b in zip(picked, picked[1:], strict=False)}
        assert max(gaps) - min(gaps) <= 1


def add_epochs(sessions, job_id: str, count: int) -> None:
    with sessions() as session:  # one executemany: 10,000 ORM objects took seconds
        session.execute(insert(EpochMetrics), [dict(job_id=job_id, epoch=epoch, attempt=1, values={"loss": 1 / epoch})
                                               for epoch in range(1, count + 1)])
        session.commit()


def test_max_points_downsamples_a_long_curve_keeping_its_first_and_last_epoch(client, alice, spec, sessions):
    job_id = client.post("/api/v1/jobs", json=spec, headers=alice).json["id"]
    add_epochs(sessions, job_id, 10_000)
    metrics = f"/api/v1/jobs/{job_id}/metrics"
    rows = client.get(f"{metrics}?max_points=1000", headers=alice).json["metrics"]
    epochs = [row["epoch"] for row in rows]
    assert len(epochs) == 1000 and epochs[0] == 1 and epochs[-1] == 10_000 and epochs == sorted(set(epochs))
    assert rows[-1] == {"epoch": 10_000, "loss": 1 / 10_000}
    after = client.get(f"{metrics}?since_epoch=9990&max_points=4", headers=alice).json["metrics"]
    assert [row["epoch"] for row in after] == [9991, 9994, 9997, 10_000]
    assert len(client.get(f"{metrics}?since_epoch=9990&max_points=50", headers=alice).json["metrics"]) == 10
    first_page = client.get(metrics, headers=alice).json  # without it, a page
    assert len(first_page["metrics"]) == METRICS_PAGE and first_page["next_since_epoch"] == METRICS_PAGE
    for bad in ("1", "0", "-5", "many", str(METRICS_PAGE + 1)):
        refused = client.get(f"{metrics}?max_points={bad}", headers=alice)
        assert refused.status_code == 422, bad
        assert refused.json["errors"][0]["path"] == "max_points"


# --- a job's network table -----------------------------------------------------------------------


def test_the_network_table_gives_each_layer_s_output_shape_and_parameters(client, alice, bob, spec):
    job_id = client.post("/api/v1/jobs", json=spec, headers=alice).json["id"]  # circles: 2 features, binary
    network = client.get(f"/api/v1/jobs/{job_id}/network", headers=alice)
    assert network.status_code == 200
    assert network.json == {
        "input_shape": [2], "n_outputs": 1, "total_parameters": 2 * 16 + 16 + 16 + 1,
        "layers": [{"index": 0, "type": "Linear", "output_shape": [16], "parameters": 48},
                   {"index": 1, "type": "ReLU", "output_shape": [16], "parameters": 0},
                   {"index": 2, "type": "Linear", "output_shape": [1], "parameters": 17}]}
    assert client.get(f"/api/v1/jobs/{job_id}/network", headers=bob).status_code == 404


def test_the_network_table_of_a_job_on_an_uploaded_dataset_and_after_its_deletion(client, alice, spec, set_job):
    csv = "a,b,c,label\n" + "".join(f"{i},{i % 3},{i % 5},{i % 4}\n" for i in range(200))
    upload = client.post("/api/v1/datasets", headers=alice, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(csv.encode()), "four.csv")})
    assert upload.status_code == 201, upload.json
    spec.update(task="multiclass", data={"source": "dataset", "dataset_id": upload.json["id"]})
    spec["model"]["layers"][-1]["out_features"] = 4
    spec.pop("loss", None)
    job_id = client.post("/api/v1/jobs", json=spec, headers=alice).json["id"]
    network = client.get(f"/api/v1/jobs/{job_id}/network", headers=alice).json
    assert (network["input_shape"], network["n_outputs"]) == ([3], 4)
    assert [layer["output_shape"] for layer in network["layers"]] == [[16], [16], [4]]

    set_job(job_id, status="succeeded")
    assert client.delete(f"/api/v1/datasets/{upload.json['id']}", headers=alice).status_code == 204
    gone = client.get(f"/api/v1/jobs/{job_id}/network", headers=alice)
    assert gone.status_code == 404
    assert gone.json["type"] == "/problems/no-network"


# --- sweeps --------------------------------------------------------------------------------------


def test_the_nav_links_each_page_the_router_shows_sweeps_included():
    nav = re.findall(r'<a href="#/(\w+)" data-page="(\w+)">', STATIC.joinpath("index.html").read_text())
    assert all(href == page for href, page in nav)
    router = STATIC.joinpath("js/main.js").read_text()
    pages = re.search(r"const pages = \{ ([\w, ]+) \};", router)[1].split(", ")
    assert sorted(page for _, page in nav) == sorted(pages) and "sweeps" in pages
    assert 'parts[0] === "sweeps" && parts[1]' in router  # #/sweeps/<id>: a sweep's own page


@pytest.mark.parametrize("module", ["sweep.js", "sweeps.js"])
def test_the_sweep_pages_read_only_fields_the_api_s_sweep_documents_have(app, module):
    # A field renamed in api/schemas.py would leave a page reading undefined, which no error says.
    schemas = openapi_document(app)["components"]["schemas"]

    def fields(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    code = STATIC.joinpath("js/pages", module).read_text()
    read = {kind: set(re.findall(rf"\b{kind}\.(\w+)", code)) for kind in ("sweep", "trial", "best", "page")}
    assert read["sweep"] and read["sweep"] <= fields("SweepOut"), read["sweep"] - fields("SweepOut")
    assert read["trial"] <= fields("TrialOut"), read["trial"] - fields("TrialOut")
    assert read["best"] <= fields("SweepBest"), read["best"] - fields("SweepBest")
    assert read["page"] <= fields("SweepList") | fields("TrialList")
    if module == "sweep.js":  # the page of one sweep reads its trials, its request's space and its best trial
        assert {"number", "job_id", "state", "params", "value", "epoch"} <= read["trial"]
        assert {"request", "best", "counts", "metric", "mode"} <= read["sweep"]
