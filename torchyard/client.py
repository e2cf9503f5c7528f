"""A small HTTP client for the torchyard API (standard library only, so it installs anywhere).

    from torchyard.client import Client
    client = Client("http://127.0.0.1:8000", token="ty_...")
    job = client.submit(spec)
    job = client.wait(job["id"])
    client.download_bundle(job["id"], "out/")
    model = torchyard.load_model("out/")
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torchyard.bundle import read_bundle, write_bundle_files

FINISHED = ("succeeded", "failed", "cancelled")
SWEEP_FINISHED = ("succeeded", "failed", "cancelled")  # a sweep's statuses once it has ended


class ApiError(Exception):
    """An error response; ``problem`` is the RFC 9457 body (title, detail, errors by field path)."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: str | None = None):
        self.status = status
        self.problem = problem
        self.retry_after = retry_after  # the Retry-After header of a 429 or 503, as sent
        errors = problem.get("errors") or []
        # With field errors, the detail only repeats the first of them: each is said once, under the title.
        head = f"{status} {problem.get('title', '')}" if errors else \
            f"{status} {problem.get('title', '')}: {problem.get('detail', '')}"
        head = head.rstrip(": ")
        if retry_after and "retry after" not in head.lower():  # waiting helps: say how long, once
            head += f" (retry after {retry_after} s)"
        lines = [head] + [f"  {e.get('path')}: {e.get('message')}" for e in errors]
        super().__init__("\n".join(lines))


class SendCutOff(ConnectionError):
    """The server closed the connection while the request's body was still being sent, and sent no answer
    that could be read: most often a body over the server's limit, refused before it was read."""

    def __init__(self, sent: int):
        self.sent = sent
        super().__init__(f"the server closed the connection while the request's body ({sent:,} bytes) was being "
                         "sent, likely because it is larger than the server's limit (max_spec_bytes for a spec, "
                         "max_upload_bytes for an upload)")


def _api_error(status: int, reason: str, raw: bytes, headers) -> ApiError:
    """The ApiError of an error response: its problem+json body, or its reason and text when it isn't one."""
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": reason, "detail": raw.decode(errors="replace")[:500]}
    return ApiError(status, problem, headers.get("Retry-After"))


class Client:
    """One API server and one token."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.base = url.rstrip("/") + "/api/v1"
        self.token = token
        self.timeout = timeout

    # --- plumbing -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                 query: dict | None = None) -> urllib.request.Request:
        url = self.base + path
        if query:
            # doseq: a list is a repeated argument (tag=a&tag=b).
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
        data = None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(url, data=data, method=method, headers=headers)

    def _open(self, request: urllib.request.Request):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise _api_error(error.code, error.reason, error.read(), error.headers) from None

    def _send(self, request: urllib.request.Request) -> Any:
        """The JSON answer to a request that carries a body (a spec, an upload).

        Sent with http.client, not urlopen: a server that refuses a body too large (413) answers before
        reading it and closes, so the send breaks (broken pipe, reset) while the answer waits unread, and
        urlopen would report only the broken pipe. Here the answer is read after such a break; when none
        can be, SendCutOff says what most likely happened."""
        parts = urllib.parse.urlsplit(request.full_url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=self.timeout)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            # The server may have answered already, without reading the rest of the body: read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request(request.get_method(), path, body=request.data, headers=request.headers)
            try:
                response = connection.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                raise SendCutOff(len(request.data or b"")) from None
        finally:
            connection.close()
        if response.status >= 400:
            raise _api_error(response.status, response.reason, raw, response.headers)
        return json.loads(raw) if raw else None

    def _json(self, method: str, path: str, **kwargs) -> Any:
        with self._open(self._request(method, path, **kwargs)) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    # --- jobs -----------------------------------------------------------------------------------

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        """Submit a spec; retried submits with the same key return the same job."""
        key = idempotency_key or str(uuid.uuid4())
        return self._send(self._request("POST", "/jobs", body=spec, headers={"Idempotency-Key": key}))

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None,
             tags: list[str] | tuple[str, ...] = (), experiment: str | None = None) -> dict:
        """One page of the caller's jobs, newest first: {"jobs": [...], "next_cursor": ...}; only those in
        ``status``, carrying every one of ``tags`` and of ``experiment``, when given."""
        return self._json("GET", "/jobs", query={"status": status, "limit": limit, "cursor": cursor,
                                                 "tag": list(tags), "experiment": experiment})

    def metrics(self, job_id: str, since_epoch: int = 0) -> list[dict]:
        """Every metrics row after ``since_epoch``, in epoch order, read a page at a time."""
        rows: list[dict] = []
        while True:
            page = self.metrics_page(job_id, since_epoch)
            rows += page["metrics"]
            if page["next_since_epoch"] is None:
                return rows
            since_epoch = page["next_since_epoch"]

    def metrics_page(self, job_id: str, since_epoch: int = 0, max_points: int | None = None) -> dict:
        """One answer of GET /jobs/{id}/metrics: {"metrics": [...], "status": ..., "next_since_epoch": ...}, a page
        of the rows after ``since_epoch`` (pass next_since_epoch for the next one); with ``max_points``, at most
        that many of them, evenly spaced, the first and the last always."""
        return self._json("GET", f"/jobs/{job_id}/metrics", query={"since_epoch": since_epoch,
                                                                   "max_points": max_points})

    def logs(self, job_id: str, since_seq: int = 0) -> dict:
        """The job's log lines after ``since_seq``: {"lines": [...], "last_seq": ..., "status": ...}; pass
        ``last_seq`` as ``since_seq`` for the lines after these."""
        return self._json("GET", f"/jobs/{job_id}/logs", query={"since_seq": since_seq})

    def follow_logs(self, job_id: str, since_seq: int = 0) -> Iterator[dict]:
        """Yield each log line after ``since_seq`` as the job writes it, over Server-Sent Events, until the job
        has finished and every line was sent (a stream the server ends early is opened again after the last)."""
        while True:
            request = self._request("GET", f"/jobs/{job_id}/logs", query={"since_seq": since_seq},
                                    headers={"Accept": "text/event-stream"})
            with self._open(request) as response:
                for event, data in _events(response):
                    if event == "end":
                        return
                    if event == "log":
                        since_seq = data["seq"]
                        yield data

    def stream_metrics(self, job_id: str, since_epoch: int = 0, retries: int = 5) -> Iterator[tuple[str, dict]]:
        """Yield ("metrics", row) for each epoch after ``since_epoch`` as the job ends it, over Server-Sent Events,
        then ("status", job) once the job has finished. A stream that ends early or drops is opened again with
        Last-Event-ID (the last epoch received), so no epoch comes twice; ``retries`` failed reconnects in a
        row (the server unreachable) raise the last error."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if since_epoch:
                headers["Last-Event-ID"] = str(since_epoch)
            request = self._request("GET", f"/jobs/{job_id}/metrics", query={"since_epoch": since_epoch},
                                    headers=headers)
            try:
                with self._open(request) as response:
                    failures = 0
                    for event, data in _events(response):
                        if event == "metrics":
                            since_epoch = data["epoch"]
                            yield event, data
                        elif event == "status":
                            yield event, data
                            return
            except ApiError as error:
                if error.status != 429:  # too many streams open: wait as told, like a dropped stream
                    raise
                failures += 1
                if failures > retries:
                    raise
                time.sleep(_retry_after(error))
            except (OSError, http.client.HTTPException):
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(2.0 ** failures / 4, 5.0))  # 0.5, 1, 2, 4, 5 s

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def delete(self, job_id: str) -> None:
        self._json("DELETE", f"/jobs/{job_id}")

    def checkpoints(self, job_id: str) -> list[dict]:
        """The checkpoints the job keeps, oldest first (epoch, name, size, sha256, created_at, download)."""
        return self._json("GET", f"/jobs/{job_id}/checkpoints")["checkpoints"]

    def follow(self, job_id: str, interval: float = 1.0) -> Iterator[tuple[dict, list[dict]]]:
        """Yield (job, new metric rows) on each poll until the job has finished."""
        seen = 0
        while True:
            job = self.job(job_id)
            rows = self.metrics(job_id, since_epoch=seen)
            if rows:
                seen = rows[-1]["epoch"]
            yield job, rows
            if job["status"] in FINISHED:
                return
            time.sleep(interval)

    def wait(self, job_id: str, timeout: float = 3600, interval: float = 0.5,
             on_update: Callable[[dict, list[dict]], None] | None = None) -> dict:
        """Poll until the job has finished; return its final state."""
        deadline = time.monotonic() + timeout
        for job, rows in self.follow(job_id, interval):
            if on_update:
                on_update(job, rows)
            if job["status"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
        raise AssertionError("unreachable")

    def download_weights(self, job_id: str, path: str | Path) -> Path:
        """Save the final weights (safetensors) to ``path``."""
        with self._open(self._request("GET", f"/jobs/{job_id}/weights")) as response:
            Path(path).write_bytes(response.read())
        return Path(path)

    def download_bundle(self, job_id: str, directory: str | Path) -> Path:
        """Weights, model card and metrics into ``directory``, ready for ``torchyard.load_model``."""
        request = self._request("GET", f"/jobs/{job_id}/weights", query={"format": "bundle"})
        with self._open(request) as response:
            # Read by allow-list (torchyard.bundle): a hostile archive can't write anything but these files.
            files = read_bundle(io.BytesIO(response.read()))
        return write_bundle_files(files, directory)

    # --- sweeps ---------------------------------------------------------------------------------

    def submit_sweep(self, request: dict) -> dict:
        """Submit a sweep request (a base spec, a space, a method…); returns the sweep."""
        return self._send(self._request("POST", "/sweeps", body=request))

    def sweep(self, sweep_id: str) -> dict:
        """A sweep: status, counts of its trials by state, the best trial so far."""
        return self._json("GET", f"/sweeps/{sweep_id}")

    def sweeps(self, limit: int = 20, cursor: str | None = None) -> dict:
        """One page of the caller's sweeps, newest first: {"sweeps": [...], "next_cursor": ...}."""
        return self._json("GET", "/sweeps", query={"limit": limit, "cursor": cursor})

    def sweep_trials(self, sweep_id: str) -> list[dict]:
        """Every trial created so far, by number: its job, state, params, epochs and metric values."""
        return self._json("GET", f"/sweeps/{sweep_id}/trials")["trials"]

    def cancel_sweep(self, sweep_id: str) -> dict:
        """Cancel a running sweep and its unfinished trials; returns the sweep."""
        return self._json("POST", f"/sweeps/{sweep_id}/cancel")

    def delete_sweep(self, sweep_id: str) -> None:
        """Delete an ended sweep with its trial jobs and their files."""
        self._json("DELETE", f"/sweeps/{sweep_id}")

    def follow_sweep(self, sweep_id: str, interval: float = 1.0) -> Iterator[tuple[dict, list[dict]]]:
        """Yield (sweep, trials) on each poll until the sweep has ended."""
        while True:
            sweep = self.sweep(sweep_id)
            yield sweep, self.sweep_trials(sweep_id)
            if sweep["status"] in SWEEP_FINISHED:
                return
            time.sleep(interval)

    # --- datasets and the rest ------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None, target: str | None = None) -> dict:
        """Upload a CSV or NPZ file (multipart/form-data)."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        fields = {"name": name or path.name, "target": target}
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
                 for key, value in fields.items() if value is not None]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(self.base + "/datasets", data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        return self._send(request)

    def datasets(self, limit: int = 50, cursor: str | None = None) -> dict:
        """One page of the caller's datasets, newest first: {"datasets": [...], "next_cursor": ...}."""
        return self._json("GET", "/datasets", query={"limit": limit, "cursor": cursor})

    def delete_dataset(self, dataset_id: str) -> None:
        self._json("DELETE", f"/datasets/{dataset_id}")

    def workers(self) -> dict:
        return self._json("GET", "/workers")

    def health(self) -> dict:
        return self._json("GET", "/health")


def _retry_after(error: ApiError) -> float:
    """The seconds a 429 asks to wait (its Retry-After), within 1 to 30."""
    try:
        return min(max(float(error.retry_after or 1), 1.0), 30.0)
    except (TypeError, ValueError):
        return 1.0


def _events(response) -> Iterator[tuple[str, Any]]:
    """(event, JSON data) of each Server-Sent Event in ``response``; comments (keep-alives) are skipped."""
    event, data = "message", []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
