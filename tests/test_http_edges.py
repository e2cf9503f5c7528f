"""What the HTTP server answers itself, before or beside the app, is problem+json naming its limit: gunicorn with
api/gunicorn_worker.py, as ``torchyard api`` and ``torchyard serve`` both run it. A real server, real sockets:
each request is written byte by byte (http.client won't send a bad one) and its answer parsed.

A stalled request must end within the read timeout (READ_TIMEOUT here); no test measures time: a server that
never answers fails on the client's socket timeout (ANSWER_SECONDS), far above it.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from dataclasses import dataclass

import pytest
from conftest import settings_env, worker_settings

from api.http_limits import MAX_HEADER_FIELD_BYTES, MAX_HEADER_FIELDS, MAX_REQUEST_LINE

API = "/api/v1"
MAX_UPLOAD = 50_000
READ_TIMEOUT = 2  # seconds: request_read_timeout_seconds of the server
ANSWER_SECONDS = 30  # the client's own timeout on every socket
CSV = b"a,b\n1,0\n0,1\n"
PROBLEM = "application/problem+json"


@dataclass
class Server:
    port: int
    token: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Settings over one migrated SQLite database, and alice's key; one upload at a time per user."""
    from api.auth import create_api_key
    from migrations.apply import upgrade
    from models.db import make_engine, make_sessionmaker

    home = tmp_path_factory.mktemp("http-edges")
    settings = worker_settings(home, max_upload_bytes=MAX_UPLOAD, max_concurrent_uploads=1,
                               request_read_timeout_seconds=READ_TIMEOUT)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        token = create_api_key(session, "alice", "test")
    engine.dispose()
    return settings, token


@pytest.fixture(scope="module")
def server(deployment) -> Server:
    """``torchyard api`` (gunicorn, one process) over the deployment's database: what ``torchyard serve`` runs too."""
    from private_servers import ApiServer

    settings, token = deployment
    server = ApiServer(settings_env(settings), settings.home / "api.log", workers=1)
    yield Server(server.port, token)
    server.stop()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def problem(self) -> dict:
        assert self.headers["Content-Type"] == PROBLEM, (self.status, self.headers, self.body[:300])
        return json.loads(self.body)


def raw(method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def exchange(server: Server, request: bytes) -> Answer:
    """Send ``request`` as it is and read the one answer (which may come before the body is all sent)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_SECONDS) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Answer(response.status, response.headers, response.read())


def multipart(content: bytes, filename: str = "d.csv") -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: text/csv\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def upload(server: Server, content: bytes = CSV, framing: str = "length") -> Answer:
    content_type, body = multipart(content)
    headers = [("Authorization", f"Bearer {server.token}"), ("Content-Type", content_type)]
    if framing == "chunked":
        return exchange(server, raw("POST", f"{API}/datasets", [*headers, ("Transfer-Encoding", "chunked")],
                                    chunked(body)))
    return exchange(server, raw("POST", f"{API}/datasets", [*headers, ("Content-Length", str(len(body)))], body))


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_upload_past_max_upload_bytes_is_a_413_naming_the_limit_and_holds_no_slot(server, framing):
    too_big = CSV + b"1,0\n" * (MAX_UPLOAD // 4)
    refused = upload(server, too_big, framing)
    assert refused.status == 413
    assert refused.problem() == {"type": "/problems/too-large", "title": "Content Too Large", "status": 413,
                                 "detail": f"the request body is larger than {MAX_UPLOAD} bytes (max_upload_bytes)"}
    assert upload(server).status == 201  # the user's one upload slot is free again


def test_a_request_line_past_its_limit_is_a_414_naming_it_and_one_below_reaches_the_app(server):
    refused = exchange(server, raw("GET", f"{API}/jobs/{'a' * (MAX_REQUEST_LINE + 10)}"))
    assert refused.status == 414
    assert refused.problem()["detail"] == (
        f"the request line (method, path and query) is longer than {MAX_REQUEST_LINE} bytes (limit_request_line)")
    # gunicorn's default (4094 bytes) would refuse this one too; ours is its most.
    served = exchange(server, raw("GET", f"{API}/jobs/{'a' * 8000}", [("Authorization", f"Bearer {server.token}")]))
    assert (served.status, served.problem()["type"]) == (404, "/problems/not-found")


@pytest.mark.parametrize("fields", [
    [("X-Big", "b" * MAX_HEADER_FIELD_BYTES)],
    [(f"X-Many-{i}", "m") for i in range(MAX_HEADER_FIELDS + 1)],
], ids=["a field too long", "too many fields"])
def test_headers_past_their_limits_are_a_431_naming_them(server, fields):
    refused = exchange(server, raw("GET", f"{API}/health", fields))
    assert refused.status == 431
    assert refused.problem()["detail"] == (
        f"a request has at most {MAX_HEADER_FIELDS} header fields (limit_request_fields), each at most "
        f"{MAX_HEADER_FIELD_BYTES} bytes (limit_request_field_size)")


def test_a_malformed_request_line_is_a_400_problem(server):
    refused = exchange(server, b"GARBAGE\r\n\r\n")
    assert (refused.status, refused.problem()["status"]) == (400, 400)
    assert "GARBAGE" in refused.problem()["detail"]


@pytest.mark.parametrize("framing", [
    [("Content-Length", "2"), ("Content-Length", "40")],
    [("Content-Length", "2"), ("Content-Length", "2")],
    [("Content-Length", "2"), ("Transfer-Encoding", "chunked")],
    [("Transfer-Encoding", "gzip")],
], ids=["two lengths", "a repeated length", "a length and chunked", "a coding other than chunked"])
def test_a_body_of_ambiguous_length_is_refused(server, framing):
    headers = [("Authorization", f"Bearer {server.token}"), ("Content-Type", "application/json"), *framing]
    refused = exchange(server, raw("POST", f"{API}/jobs", headers, b"{}"))
    assert refused.status == 400
    assert refused.problem()["type"] == "/problems/ambiguous-length"
    assert "Content-Length" in refused.problem()["detail"]


@pytest.mark.parametrize(("path", "methods"), [
    (f"{API}/health", {"GET", "HEAD", "OPTIONS"}),
    (f"{API}/jobs", {"GET", "HEAD", "OPTIONS", "POST"}),
])
def test_options_is_a_204_with_the_routes_methods_and_no_body(server, path, methods):
    for headers in ([("Authorization", f"Bearer {server.token}")], []):  # a CORS preflight sends no key
        answer = exchange(server, raw("OPTIONS", path, headers))
        assert answer.status == 204
        assert {method.strip() for method in answer.headers["Allow"].split(",")} == methods
        assert "Content-Type" not in answer.headers
        assert answer.body == b""


def test_an_http_version_the_server_does_not_speak_is_the_clients_400_not_a_505(server):
    refused = exchange(server, f"GET {API}/health HTTP/9.9\r\nHost: x\r\n\r\n".encode())
    assert (refused.status, refused.problem()["status"]) == (400, 400)
    assert refused.headers["Content-Type"] == "application/problem+json"


def test_a_stalled_upload_is_a_408_within_the_read_timeout_and_frees_its_slot(server):
    content_type, body = multipart(CSV)
    head = raw("POST", f"{API}/datasets", [("Authorization", f"Bearer {server.token}"),
                                          ("Content-Type", content_type), ("Content-Length", str(MAX_UPLOAD))])
    stalled = exchange(server, head + body[:40])  # then nothing more, ever (within the limit: not a 413)
    assert stalled.status == 408
    assert stalled.problem() == {
        "type": "/problems/request-timeout", "title": "Request Timeout", "status": 408,
        "detail": f"the request body stalled: nothing of it came for {READ_TIMEOUT} s (request_read_timeout_seconds)"}
    assert upload(server).status == 201  # not 429: the stalled upload gave its slot back


def test_a_stalled_request_head_is_closed_within_the_read_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_SECONDS) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
        assert sock.recv(1024) == b""  # the server hung up (no answer: nothing was asked yet)
    assert exchange(server, raw("GET", f"{API}/health")).status == 200
