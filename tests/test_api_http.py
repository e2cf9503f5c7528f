"""The API over real HTTP: a werkzeug server in a thread, spoken to with urllib."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_submit_poll_cancel_and_download_over_http(live_server, tokens, spec, add_artifact, set_job):
    api = f"{live_server}/api/v1"
    status, _, body = call(f"{api}/jobs", "POST", spec)
    assert status == 401
    status, headers, body = call(f"{api}/jobs", "POST", spec, tokens["alice"])
    assert status == 201
    job = json.loads(body)
    assert headers["Location"] == f"/api/v1/jobs/{job['id']}"

    status, _, body = call(f"{api}/jobs/{job['id']}", token=tokens["bob"])
    assert status == 404
    assert json.loads(body)["status"] == 404

    add_artifact(job["id"], "weights", "weights.safetensors", b"\x00" * 100_000)
    set_job(job["id"], status="succeeded", epoch=5)
    status, _, body = call(f"{api}/jobs/{job['id']}", token=tokens["alice"])
    assert json.loads(body)["progress"] == {"epoch": 5, "epochs": 5}
    status, headers, body = call(f"{api}/jobs/{job['id']}/weights", token=tokens["alice"])
    assert status == 200
    assert body == b"\x00" * 100_000
    assert headers["Content-Type"] == "application/octet-stream"

    status, headers, body = call(f"{api}/jobs/{job['id']}/cancel", "POST", token=tokens["alice"])
    assert status == 409
    assert headers["Content-Type"] == "application/problem+json"
    status, _, _ = call(f"{api}/jobs/{job['id']}", "DELETE", token=tokens["alice"])
    assert status == 204

    status, _, body = call(f"{api}/health")
    assert (status, json.loads(body)["status"]) == (200, "ok")
