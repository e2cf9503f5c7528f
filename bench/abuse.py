"""Hostile input against a running service, over real HTTP: what each probe got and what it left stored.

    python bench/abuse.py                          # its own service, in a temporary TORCHYARD_HOME
    python bench/abuse.py --url URL --token TOKEN  # a service that runs already (e.g. `torchyard serve`)

The probes are the hostile-input table of the tests (tests/hostile_probes.py: every endpoint), then probes of
the whole service: a burst of submissions from one key, metrics streams held open while /health is asked,
NPZ zip bombs, jobs over the memory budget (tests/test_memory_estimate.py's), requests sent chunked or as
raw bytes, and an upload while the key's other uploads are in progress. The table's probes aim at a job of
the bench's own (finished, with metrics and files: written directly when the bench started the service,
trained by the service's worker otherwise, if it has one), a dataset, and a job that no worker serves (its
queue, gpu.4, has none), which the streams follow.

Self-started, it does what `torchyard serve` does except the worker: migrate, make a key, serve the API with
werkzeug (threaded) on a free port; SQLite, the filesystem broker and a local store under the temporary
home. "Stored" is then counted in the database, the store's folder and the broker's queue folder directly,
and through the API's listings (said only where they disagree). Against --url it is what the API lists: the
key's jobs and datasets, the metrics and checkpoints of the job the probes aim at; what the bench made
there is deleted at the end. A status other than the table's is shown as ``got≠want``, and "!" marks an
answer that isn't a short problem naming the field. Exits 1 if any probe got a 5xx or no answer.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import zlib  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from hostile_probes import API, CSV, DEEP, MAX_ANSWER_BYTES, PROBES, Probe, multipart, names  # noqa: E402
from specs import blobs_spec, circles_spec  # noqa: E402

PROBLEM = "application/problem+json"
TIMEOUT = 30.0  # seconds for one answer; a probe that waits longer got none
BURST = 200  # submissions from one key, BURST_THREADS at a time
BURST_THREADS = 8
STREAMS = 30
# A job that no worker takes here (no worker serves 4-GPU jobs): it stays queued, so its streams stay open.
PARKED = {**circles_spec("abuse-parked"), "resources": {"device": "cuda", "gpus": 4}}
LIMIT_NAME = re.compile(r"\((max_\w+|quota_\w+|rate_limit_\w+|TORCHYARD_MAX_\w+)\)")  # a setting named in a detail
FINISHED = ("succeeded", "failed", "cancelled")


# --- HTTP over plain sockets: any byte in a path or header, a chunked body, a body that is never sent ------


@dataclass
class Answer:
    """What came back: status 0 when nothing did (``body`` then says why)."""

    status: int
    content_type: str = ""
    body: bytes = b""
    seconds: float = 0.0

    def json(self) -> dict:
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Http:
    """Requests to one service, each on a connection of its own (``Connection: close``)."""

    def __init__(self, url: str, token: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.auth = {"Authorization": f"Bearer {token}"}

    def head(self, method: str, target: bytes, headers: dict, length: int | None) -> bytes:
        """Request line and headers; no length means a chunked body."""
        lines = [method.encode() + b" " + target + b" HTTP/1.1", f"Host: {self.host}:{self.port}".encode(),
                 b"Connection: close"]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
        lines.append(b"Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def open(self, method: str, target: str | bytes, body: bytes | None = None, headers: dict | None = None,
             *, chunks: Iterable[bytes] | None = None, length: int | None = None, auth: bool = True,
             timeout: float = TIMEOUT) -> tuple[socket.socket, Callable[[], None]]:
        """A socket with the request on its way (written by a thread, so an early answer is read while the
        body still goes out), and a function that waits for the writer."""
        target = target if isinstance(target, bytes) else target.encode()
        headers = {**(self.auth if auth else {}), **(headers or {})}
        if chunks is not None:
            pieces = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks] + [b"0\r\n\r\n"]
            head = self.head(method, target, headers, None)
        else:
            pieces = [body or b""]
            head = self.head(method, target, headers, len(body or b"") if length is None else length)
        sock = socket.create_connection((self.host, self.port), timeout=timeout)

        def write() -> None:
            try:
                sock.sendall(head)
                for piece in pieces:
                    sock.sendall(piece)
            except OSError:
                pass  # the server answered without reading it all, and closed: its answer is what counts

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        return sock, lambda: writer.join(timeout)

    def send(self, method: str, target: str | bytes, body: bytes | None = None, headers: dict | None = None,
             **options) -> Answer:
        """One request and its answer."""
        started = time.perf_counter()
        try:
            sock, written = self.open(method, target, body, headers, **options)
        except OSError as exc:
            return Answer(0, body=f"no connection: {exc}".encode())
        with sock:
            answer = read_answer(sock, method)
            written()
        answer.seconds = time.perf_counter() - started
        return answer

    def json(self, method: str, path: str, value=None) -> dict:
        """A request that must succeed (setup, listings); its JSON."""
        body = None if value is None else json.dumps(value).encode()
        answer = self.send(method, path, body, {"Content-Type": "application/json"} if body else {})
        if not 200 <= answer.status < 300:
            raise SystemExit(f"{method} {path}: {answer.status} {answer.body[:300]!r}")
        return answer.json()


def read_answer(sock: socket.socket, method: str) -> Answer:
    """The response on ``sock`` (head and body), or status 0 with what went wrong."""
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        return Answer(response.status, response.getheader("Content-Type", ""), response.read())
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, body=f"no answer: {type(exc).__name__}".encode())
    finally:
        response.close()


# --- what is stored: through the API's listings, and (self-started) in the database, store and broker ----


def listed(http: Http, path: str, key: str, value: Callable[[dict], object], query: str = "", pages: int = 5) -> dict:
    """Items of a paginated listing by id (at most ``pages`` pages of 100, newest first)."""
    items, cursor = {}, None
    for _ in range(pages):
        page = http.json("GET", f"{API}{path}?{query}limit=100" + (f"&cursor={cursor}" if cursor else ""))
        items.update({item["id"]: value(item) for item in page[key]})
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return items


def api_view(http: Http, job_id: str) -> dict[str, dict]:
    """What the API lists: the key's jobs and datasets, and the aimed-at job's metrics and checkpoints."""
    metrics = http.json("GET", f"{API}/jobs/{job_id}/metrics")["metrics"]
    checkpoints = http.json("GET", f"{API}/jobs/{job_id}/checkpoints")["checkpoints"]
    return {
        "jobs": listed(http, "/jobs", "jobs", lambda j: (j["status"], j["cancel_requested"])),
        "datasets": listed(http, "/datasets", "datasets", lambda d: d["sha256"]),
        "metrics": {m["epoch"]: m for m in metrics},
        "checkpoints": {c["name"]: c["sha256"] for c in checkpoints},
    }


def change(before: dict[str, dict], after: dict[str, dict]) -> dict[str, tuple[int, int, int]]:
    """Per kind of thing: how many were added, removed and changed."""
    out = {}
    for kind in after:
        old, new = before.get(kind, {}), after[kind]
        counts = (len(new.keys() - old.keys()), len(old.keys() - new.keys()),
                  sum(old[k] != new[k] for k in old.keys() & new.keys()))
        if any(counts):
            out[kind] = counts
    return out


def describe(changes: dict[str, tuple[int, int, int]]) -> str:
    """``+200 job rows, +200 messages``, or ``nothing``."""
    parts = []
    for kind, (added, removed, changed) in changes.items():
        parts += [f"+{added} {kind}"] * bool(added) + [f"-{removed} {kind}"] * bool(removed)
        parts += [f"{changed} {kind} changed"] * bool(changed)
    return ", ".join(parts) or "nothing"


# --- the service under test ------------------------------------------------------------------------------


class Remote:
    """A service that runs already; what is stored is what its API lists."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/").removesuffix(API)
        self.token = token
        self.own = False

    def stored(self) -> None:
        return None

    def close(self) -> None:
        pass


class OwnService:
    """``torchyard serve`` without its worker, in a temporary home: migrate, a key, the API on a free port."""

    def __init__(self):
        from werkzeug.serving import make_server

        from api import create_app
        from migrations.apply import upgrade
        from models.settings import Settings
        from torchyard.serve import local_token

        self.home = Path(tempfile.mkdtemp(prefix="torchyard-abuse-"))
        # The table's probes send more reads and uploads within a minute than a key's budgets allow, and each
        # probe must meet the limit it is about: those two budgets are raised here. Submissions keep theirs.
        generous = {"rate_limit_read": "100000/minute", "rate_limit_upload": "100000/minute"}
        self.settings = Settings(home=self.home, **generous).resolved()
        upgrade(self.settings.database_url)
        self.token = local_token(self.settings)
        self.app = create_app(self.settings.model_dump())
        self.services = self.app.extensions["torchyard"]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.own = True

    def stored(self) -> dict[str, dict]:
        """Rows, files and broker messages, read directly."""
        from sqlalchemy import select

        from models.tables import Artifact, Dataset, EpochMetrics, Job, StreamSlot

        with self.services.sessions() as session:
            rows = {
                "job rows": dict(session.execute(select(Job.id, Job.status)).all()),
                "dataset rows": dict(session.execute(select(Dataset.id, Dataset.sha256)).all()),
                "artifact rows": dict(session.execute(select(Artifact.id, Artifact.sha256)).all()),
                "metric rows": {(j, e): a for j, e, a in session.execute(
                    select(EpochMetrics.job_id, EpochMetrics.epoch, EpochMetrics.attempt))},
                "stream slots": dict(session.execute(select(StreamSlot.id, StreamSlot.user_id)).all()),
            }
        return {**rows, "files": files(Path(self.settings.artifacts_url)), "messages": files(self.home / "broker")}

    def finish(self, job_id: str) -> None:
        """Make ``job_id`` a finished job with metrics, weights and a checkpoint, written directly (no worker
        here), as tests/test_api_hostile.py's deployment does: the probes aim at a job with files."""
        from models.tables import Artifact, EpochMetrics, Job

        store = self.services.store
        with self.services.sessions() as session:
            session.add(EpochMetrics(job_id=job_id, epoch=1, attempt=1, values={"loss": 0.5}))
            for kind, name, epoch in (("weights", "weights.safetensors", None), ("checkpoint", "c-0001.pt", 1)):
                uri, size, sha256 = store.put_bytes(b"w" * 10, f"jobs/{job_id}/{name}")
                session.add(Artifact(job_id=job_id, kind=kind, name=name, uri=uri, size=size, sha256=sha256,
                                     epoch=epoch))
            session.get(Job, job_id).status = "succeeded"
            session.commit()

    def close(self) -> None:
        from api.upload_slots import slot_folder

        self.server.shutdown()
        self.thread.join(10)
        self.services.engine.dispose()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(slot_folder(self.settings.database_url), ignore_errors=True)  # the API's, in /tmp


def files(folder: Path) -> dict[str, int]:
    """The files under ``folder`` with their sizes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# --- one row of the table ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one probe got: ``status`` as shown; ``ok`` whether that is what it should get."""

    status: str
    problem: str
    ok: bool = True
    codes: tuple[int, ...] = ()  # every status its requests got (0: no answer)
    note: str = ""  # added to the stored column
    after: Callable[[], None] | None = None  # undo what the probe made, once what it stored is counted


@dataclass
class Row:
    probe: str
    outcome: Outcome
    stored: str
    nothing: bool


def problem_text(answer: Answer) -> str:
    """The problem's type (or title), the field it names and the limit: ``validation-error seed``."""
    if answer.status == 0:
        return answer.body.decode(errors="replace")
    if PROBLEM not in answer.content_type:
        return answer.content_type or "-"
    problem = answer.json()
    kind = problem.get("type", "").removeprefix("/problems/")
    kind = problem.get("title", "") if kind in ("", "about:blank") else kind
    path = next((e.get("path") for e in problem.get("errors", []) if e.get("path")), "")
    limit = LIMIT_NAME.search(problem.get("detail", ""))
    setting = limit.group(1).removeprefix("TORCHYARD_").lower() if limit else ""
    return " ".join(part for part in (kind, path, setting and f"({setting})") if part)


def single(answer: Answer, want: int, field_name: str | None = None) -> Outcome:
    """The outcome of one request that should get ``want``, a short problem naming ``field_name``."""
    shown = str(answer.status) if answer.status == want else f"{answer.status}≠{want}"
    problem = answer.json() if PROBLEM in answer.content_type else None
    well_formed = (problem is not None and len(answer.body) <= MAX_ANSWER_BYTES
                   and (field_name is None or names(problem, field_name)))
    return Outcome(shown if well_formed or answer.status == 0 else shown + " !", problem_text(answer),
                   ok=answer.status == want and well_formed, codes=(answer.status,))


class Bench:
    """The service, the rows the probes aim at, and the table being printed."""

    def __init__(self, service):
        self.service = service
        self.http = Http(service.url, service.token)
        self.rows: list[Row] = []
        self.made_jobs: list[str] = []
        self.streams: list[tuple[socket.socket, http.client.HTTPResponse]] = []  # held open by open_streams

    def setup(self) -> None:
        """The job the probes aim at (finished where the bench can make it so), a dataset, a parked job."""
        job = self.submit(circles_spec("abuse-target", epochs=2, checkpoints=True))
        if self.service.own:
            self.service.finish(job)
        else:
            self.wait_finished(job)
        body, content_type = multipart("abuse.csv", CSV)
        answer = self.http.send("POST", f"{API}/datasets", body, {"Content-Type": content_type})
        if answer.status != 201:
            raise SystemExit(f"uploading a dataset: {answer.status} {answer.body[:300]!r}")
        self.ids = {"job": job, "queued": self.submit(PARKED), "dataset": answer.json()["id"]}

    def submit(self, spec: dict) -> str:
        job_id = self.http.json("POST", f"{API}/jobs", spec)["id"]
        self.made_jobs.append(job_id)
        return job_id

    def wait_finished(self, job_id: str, timeout: float = 120) -> None:
        """Wait for a job to finish, while a worker is alive (none listed for 20 s: leave it queued)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.http.json("GET", f"{API}/jobs/{job_id}")["status"] in FINISHED:
                return
            if time.monotonic() - started > 20 and not self.http.json("GET", f"{API}/workers")["live_workers"]:
                print(f"(no live worker: the job the probes aim at, {job_id}, stays queued)", file=sys.stderr)
                return
            time.sleep(0.5)

    def view(self) -> tuple[dict, dict | None]:
        return api_view(self.http, self.ids["job"]), self.service.stored()

    def run(self, name: str, probe: Callable[[], Outcome]) -> None:
        """Run one probe between two counts of what is stored; print its row."""
        api_before, own_before = self.view()
        outcome = probe()
        api_after, own_after = self.view()
        api_changes = change(api_before, api_after)
        if own_after is None:
            changes, stored = api_changes, describe(api_changes)
        else:
            changes = change(own_before, own_after)
            stored = describe(changes)
            listed_rows = {k: v for k, v in changes.items() if k in ("job rows", "dataset rows")}
            if {k.removesuffix(" rows") + "s": v for k, v in listed_rows.items()} != {
                    k: v for k, v in api_changes.items() if k in ("jobs", "datasets")}:
                stored += f" (the API lists {describe(api_changes)})"
        row = Row(name, outcome, stored + (f"; {outcome.note}" if outcome.note else ""), not changes)
        self.rows.append(row)
        print_row(row)
        if outcome.after is not None:
            outcome.after()

    def table_probe(self, probe: Probe) -> Outcome:
        answer = self.http.send(probe.method, probe.path.format(**self.ids), probe.body,
                                {**({"Content-Type": probe.content_type} if probe.body is not None else {}),
                                 **probe.headers})
        return single(answer, probe.status, probe.names)

    def cleanup(self) -> None:
        """Delete what the bench made on a service it didn't start (cancelled first, where unfinished)."""
        for job_id in self.made_jobs:
            self.http.send("POST", f"{API}/jobs/{job_id}/cancel")
        deadline = time.monotonic() + 60
        left = list(self.made_jobs)
        while left and time.monotonic() < deadline:
            left = [j for j in left if self.http.send("DELETE", f"{API}/jobs/{j}").status not in (204, 404)]
            if left:
                time.sleep(0.5)
        self.http.send("DELETE", f"{API}/datasets/{self.ids['dataset']}")
        if left:
            print(f"(could not delete {len(left)} job(s) the bench made: {', '.join(left[:5])})", file=sys.stderr)


# --- probes of the whole service --------------------------------------------------------------------------


def burst(bench: Bench) -> Outcome:
    """BURST submissions from one key, BURST_THREADS at a time: how many were taken; the queue then."""
    def one(index: int) -> Answer:
        spec = {**blobs_spec(f"abuse-burst-{index}", epochs=1, n_samples=200), "seed": index}
        return bench.http.send("POST", f"{API}/jobs", json.dumps(spec).encode(), {"Content-Type": "application/json"})

    with ThreadPoolExecutor(BURST_THREADS) as pool:
        answers = list(pool.map(one, range(BURST)))
    made = [a.json()["id"] for a in answers if a.status == 201]
    bench.made_jobs += made
    queued = len(listed(bench.http, "/jobs", "jobs", lambda job: job["status"], query="status=queued&"))
    statuses = Counter(a.status for a in answers)
    refusals = [a for a in answers if a.status != 201]

    def cancel() -> None:  # so that a worker, if there is one, doesn't train them all
        for job_id in made:
            bench.http.send("POST", f"{API}/jobs/{job_id}/cancel")

    return Outcome(", ".join(f"{s} ({n})" for s, n in sorted(statuses.items())),
                   problem_text(refusals[0]) if refusals else "-",
                   codes=tuple(statuses.elements()),
                   note=f"the key has {queued} queued jobs", after=cancel)



def open_streams(bench: Bench) -> Outcome:
    """STREAMS metrics streams of the parked job from one key, opened one after another and held open."""
    path = f"{API}/jobs/{bench.ids['queued']}/metrics?stream=1"
    statuses: Counter = Counter()
    refusal = None
    for _ in range(STREAMS):
        sock, _written = bench.http.open("GET", path, headers={"Accept": "text/event-stream"})
        response = http.client.HTTPResponse(sock, method="GET")
        try:
            response.begin()
        except (OSError, http.client.HTTPException):
            statuses[0] += 1
            sock.close()
            continue
        statuses[response.status] += 1
        if response.status == 200:
            bench.streams.append((sock, response))  # the head came; the events would follow
        else:
            refusal = refusal or Answer(response.status, response.getheader("Content-Type", ""), response.read())
            sock.close()
    return Outcome(", ".join(f"{s} ({n})" for s, n in sorted(statuses.items())),
                   problem_text(refusal) if refusal else "-", ok=set(statuses) <= {200, 429},
                   codes=tuple(statuses.elements()))


def ask_while_streaming(bench: Bench) -> Outcome:
    """/health and GET /jobs while the streams are open: do they answer, and how soon."""
    health = bench.http.send("GET", f"{API}/health", auth=False, timeout=10)
    jobs = bench.http.send("GET", f"{API}/jobs?limit=1", timeout=10)
    state = health.json().get("status", problem_text(health))
    return Outcome(f"{health.status}, {jobs.status}",
                   f"health {state} in {health.seconds * 1000:.0f} ms, jobs in {jobs.seconds * 1000:.0f} ms",
                   ok=health.status == jobs.status == 200, codes=(health.status, jobs.status))


def hang_up(bench: Bench) -> Outcome:
    """The stream clients hang up: how soon are their slots given back (self-started: the rows are gone;
    otherwise: a new stream is admitted)."""
    held = len(bench.streams)
    started = time.monotonic()
    for sock, response in bench.streams:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        response.close()
        sock.close()
    bench.streams.clear()
    freed = poll(lambda: not bench.service.stored()["stream slots"] if bench.service.own else admitted(bench))
    seconds = time.monotonic() - started
    what = f"{held} slots given back" if bench.service.own else "a new stream admitted"
    return Outcome("-", f"{what} in {seconds:.1f} s" if freed else f"not given back after {seconds:.0f} s",
                   ok=freed)


def admitted(bench: Bench) -> bool:
    """Whether a new stream of the parked job is admitted now (it is closed at once)."""
    sock, _written = bench.http.open("GET", f"{API}/jobs/{bench.ids['queued']}/metrics?stream=1")
    with sock:
        answer = http.client.HTTPResponse(sock, method="GET")
        try:
            answer.begin()
        except (OSError, http.client.HTTPException):
            return False
        return answer.status == 200


def poll(condition: Callable[[], bool], timeout: float = 15, every: float = 0.1) -> bool:
    """Whether ``condition`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


# NPZ zip bombs: zeros deflate about 1000:1, so a member of gigabytes is a few megabytes of upload.
ZERO_BLOCK = 16 << 20


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header (magic string included) of a float64 array of ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def zero_member(name: str, shape: tuple[int, ...]) -> tuple[str, bytes, int, int]:
    """A zip member holding a float64 .npy array of zeros: (name, deflated bytes, CRC-32, size)."""
    header = npy_header(shape)
    whole, rest = divmod(8 * math.prod(shape), ZERO_BLOCK)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [compressor.compress(header), compressor.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(header)
    if whole:
        # A full flush starts the compressor afresh, so each block of zeros deflates to the same bytes.
        block = bytes(ZERO_BLOCK)
        out += [compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)] * whole
        for _ in range(whole):
            crc = zlib.crc32(block, crc)
    out.append(compressor.compress(bytes(rest)) + compressor.flush())
    return name, b"".join(out), zlib.crc32(bytes(rest), crc), len(header) + 8 * math.prod(shape)


def zip_archive(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip file of deflated members (written by hand: zipfile would deflate gigabytes of zeros itself)."""
    local, central, offset = [], [], 0
    for name, data, crc, size in members:
        raw = name.encode()
        head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(raw), 0)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                                   len(raw), 0, 0, 0, 0, 0, offset) + raw)
        local.append(head + raw + data)
        offset += len(head) + len(raw) + len(data)
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), offset, 0)
    return b"".join(local) + directory + end


def upload_npz(bench: Bench, members: list[tuple[str, bytes, int, int]], field_name: str) -> Outcome:
    """Upload an NPZ file made of ``members``; it must be refused (422) naming ``field_name``."""
    body, content_type = multipart("bomb.npz", zip_archive(members))
    answer = bench.http.send("POST", f"{API}/datasets", body, {"Content-Type": content_type})
    outcome = single(answer, 422, field_name)
    outcome.note = f"{len(body) / 1e6:.1f} MB sent, {sum(m[3] for m in members) / 1e9:.1f} GB unpacked"
    return outcome


def bomb_beside(bench: Bench) -> Outcome:
    """The issue's bomb: small X.npy and y.npy that pass every check, and members X and y that np.load()
    would read instead: 1 GB of zeros."""
    return upload_npz(bench, [zero_member("X.npy", (4, 2)), zero_member("y.npy", (4,)),
                              zero_member("X", (125_000, 1000)), zero_member("y", (125_000,))], "file")


def bomb_unpacked(bench: Bench) -> Outcome:
    """X.npy and y.npy alone, within max_samples rows, unpacking to 2.4 GB: past max_upload_bytes × 20."""
    return upload_npz(bench, [zero_member("X.npy", (1_000_000, 300)), zero_member("y.npy", (1_000_000,))], "file")


def memory_probe(bench: Bench, spec: dict, field_name: str) -> Outcome:
    """A spec within every other limit whose estimated memory is over max_job_memory: 422 naming the layer
    (or the data) that needs it."""
    answer = bench.http.send("POST", f"{API}/jobs", json.dumps(spec).encode(), {"Content-Type": "application/json"})
    return single(answer, 422, field_name)


def chunked_spec(bench: Bench, body: bytes, want: int, field_name: str) -> Outcome:
    """A spec sent with Transfer-Encoding: chunked, so no Content-Length tells its size."""
    pieces = [body[start:start + 65536] for start in range(0, len(body), 65536)]
    answer = bench.http.send("POST", f"{API}/jobs", headers={"Content-Type": "application/json"}, chunks=pieces)
    return single(answer, want, field_name)


def huge_length(bench: Bench) -> Outcome:
    """Content-Length: 1 TB and no body: refused from the header, without waiting for the body."""
    answer = bench.http.send("POST", f"{API}/jobs", b"", {"Content-Type": "application/json"}, length=10**12,
                             timeout=10)
    return single(answer, 413, "max_spec_bytes")


def raw_nul(bench: Bench) -> Outcome:
    """A NUL byte, not %00, in the request line's path."""
    return single(bench.http.send("GET", f"{API}/jobs/x".encode() + b"\x00"), 404)


def upload_while_busy(bench: Bench, most: int = 8) -> Outcome:
    """Uploads of one key held open (their bodies never finish) until one more is refused; then they hang up.

    An upload with no file is refused (422) once it gets a slot, and without one (429) before its body is
    read: so it tells whether the key's slots are all held, and stores nothing either way."""
    head, content_type = multipart("held.csv", CSV)
    empty, empty_type = multipart("", b"", name="no file")

    def one_more() -> Answer:
        return bench.http.send("POST", f"{API}/datasets", empty, {"Content-Type": empty_type})

    held, answer = [], one_more()
    while answer.status == 422 and len(held) < most:
        sock, _written = bench.http.open("POST", f"{API}/datasets", head[:150], {"Content-Type": content_type},
                                         length=1_000_000)
        held.append(sock)
        deadline = time.monotonic() + 1.5  # for the server to take this one's slot
        answer = one_more()
        while answer.status == 422 and time.monotonic() < deadline:
            time.sleep(0.05)
            answer = one_more()
    for sock in held:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    free = poll(lambda: one_more().status == 422, timeout=15)
    outcome = single(answer, 429, "TORCHYARD_MAX_CONCURRENT_UPLOADS")
    outcome.note = f"{len(held)} held open, then hung up" + ("" if free else "; their slots not given back")
    outcome.ok = outcome.ok and free
    return outcome


def whole_service(bench: Bench) -> list[tuple[str, Callable[[], Outcome]]]:
    """The probes of the whole service, in the order they run: the burst last, as it leaves the most."""
    from test_memory_estimate import PROBES as MEMORY_PROBES  # the specs the memory budget must refuse

    big_spec = json.dumps({**circles_spec("big"), "name": "n" * (2 * 1024 * 1024)}).encode()
    rows = [
        ("spec nested 100000 deep, sent chunked", lambda: chunked_spec(bench, DEEP.encode(), 422, "max_json_depth")),
        ("spec of 2 MB sent chunked (no length)", lambda: chunked_spec(bench, big_spec, 413, "max_spec_bytes")),
        ("Content-Length of 1 TB, no body sent", lambda: huge_length(bench)),
        ("raw NUL byte in the request path", lambda: raw_nul(bench)),
        ("NPZ bomb: X and y beside X.npy, y.npy", lambda: bomb_beside(bench)),
        ("NPZ bomb: X.npy unpacks to 2.4 GB", lambda: bomb_unpacked(bench)),
    ]
    rows += [(f"memory: {name}", functools.partial(memory_probe, bench, spec, field_name))
             for name, (spec, field_name) in MEMORY_PROBES.items()]
    return rows + [
        ("an upload while the key's others run", lambda: upload_while_busy(bench)),
        (f"{STREAMS} metrics streams open at once, one key", lambda: open_streams(bench)),
        ("/health and GET /jobs while they're open", lambda: ask_while_streaming(bench)),
        (f"the {STREAMS} stream clients hang up", lambda: hang_up(bench)),
        (f"{BURST} quick submissions, one key", lambda: burst(bench)),
    ]


WIDTHS = (40, 17, 55)


def line(probe: str, status: str, problem: str, stored: str) -> str:
    """One fixed-width line of the table."""
    cells = (probe, status, cut(problem, WIDTHS[2]))
    return " ".join(f"{cell:<{width}}" for cell, width in zip(cells, WIDTHS, strict=True)) + " " + stored


def print_row(row: Row) -> None:
    print(line(row.probe, row.outcome.status, row.outcome.problem, row.stored), flush=True)


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def summary(rows: list[Row]) -> str:
    """The last line: how many probes, how many got a 5xx (or nothing), how many stored nothing."""
    server_errors = sum(any(code >= 500 for code in r.outcome.codes) for r in rows)
    unanswered = sum(0 in r.outcome.codes for r in rows)
    no_answer = f"{unanswered} got no answer, " if unanswered else ""
    return f"{len(rows)} probes, {server_errors} answered 5xx, {no_answer}{sum(r.nothing for r in rows)} stored nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000 (default: start one)")
    parser.add_argument("--token", help="its API key (with --url)")
    args = parser.parse_args()
    if bool(args.url) != bool(args.token):
        parser.error("--url and --token go together")
    started = time.monotonic()
    service = Remote(args.url, args.token) if args.url else OwnService()
    bench = Bench(service)
    try:
        bench.setup()
        where = ("its own service (SQLite, filesystem broker, local store; no worker); stored = rows, files and "
                 "broker messages" if service.own else "a running service; stored = what its API lists")
        print(f"{len(PROBES)} probes of the hostile-input table, then the whole service, over HTTP to {service.url}, "
              f"{where}")
        print(line("probe", "status", "problem", "stored"))
        probes = [(p.name, functools.partial(bench.table_probe, p)) for p in PROBES] + whole_service(bench)
        for name, probe in probes:
            bench.run(name, probe)
    finally:
        if not service.own and hasattr(bench, "ids"):
            bench.cleanup()
        service.close()
    off = [row.probe for row in bench.rows if not row.outcome.ok]
    if off:
        print(f"{len(off)} got other than expected: {'; '.join(off)}")
    print(f"({time.monotonic() - started:.0f} s)")
    print(summary(bench.rows))
    sys.exit(1 if any(code == 0 or code >= 500 for row in bench.rows for code in row.outcome.codes) else 0)


if __name__ == "__main__":
    main()
