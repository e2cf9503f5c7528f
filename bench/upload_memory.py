"""Memory and time of a large CSV upload: the API process's peak resident memory before and after one upload
over real HTTP, as a ratio to the file's size, against NumPy's loadtxt reading the same file whole.

    python bench/upload_memory.py [--rows 1000000] [--columns 11]
    python bench/upload_memory.py --measure upload FILE     # one measurement as JSON (tests/ use it)

Each measurement runs in a process of its own, so one's peak can't hide another's:
  upload   the API (create_app over a fresh SQLite database and artifact folder) served by werkzeug in a
           thread; a tiny upload first (imports, first request), then FILE streamed to POST /datasets over
           a socket in 64 KiB writes, so the client side holds next to nothing
  loadtxt  numpy.loadtxt of FILE, the plain way to read it whole (the baseline)
and reports the resident memory before and the peak after (VmRSS, then VmHWM of /proc/self/status). The
goal (issue #10): the upload's growth stays within twice the file's size; before the bounded reader a 93 MB
file raised the API process from 97 MB to 736 MB.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

BLOCK = 64 * 1024


def memory_kib(field: str) -> int:
    """A line of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak since the last reset).

    Not ru_maxrss: Linux carries a parent's peak into a child across fork and exec, so a process started
    from a large one (pytest with torch loaded) would report its parent's peak, not its own."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def reset_peak() -> int:
    """Restart the peak at the memory resident now (clear_refs 5 resets VmHWM); the resident KiB."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return memory_kib("VmRSS")


def write_csv(path: Path, rows: int, columns: int, seed: int = 0) -> int:
    """A numeric CSV of ``rows`` × ``columns`` (the last an integer label), written a block at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        handle.write(",".join([f"x{i}" for i in range(columns - 1)] + ["label"]) + "\n")
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            block = np.column_stack([rng.normal(size=(n, columns - 1)), rng.integers(0, 3, size=n)])
            np.savetxt(handle, block, delimiter=",", fmt=["%.6f"] * (columns - 1) + ["%d"])
    return path.stat().st_size


class NoPublisher:
    """The bench submits no jobs."""

    def publish(self, job_id: str, queue: str) -> None:
        raise AssertionError("nothing is published here")


def post_file(port: int, token: str, path: Path, filename: str) -> tuple[int, bytes]:
    """POST ``path`` as the multipart field ``file``, streamed from disk; (status, body)."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: text/csv\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        with open(path, "rb") as handle:
            while block := handle.read(BLOCK):
                yield block
        yield tail

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/api/v1/datasets", body=body(), headers={
        "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + path.stat().st_size + len(tail))})
    response = connection.getresponse()
    answer = response.status, response.read()
    connection.close()
    return answer


def measure_upload(path: Path) -> dict:
    """Serve the API in this process and upload ``path`` to it once; peaks before and after."""
    from werkzeug.serving import make_server

    from api import create_app
    from api.auth import create_api_key
    from migrations.apply import upgrade

    with tempfile.TemporaryDirectory(prefix="torchyard-bench-") as folder:
        database_url = f"sqlite:///{folder}/bench.db"
        upgrade(database_url)
        app = create_app({"home": folder, "database_url": database_url, "artifacts_url": f"{folder}/artifacts",
                          "broker_url": "filesystem://", "max_upload_bytes": path.stat().st_size + 2**20},
                         NoPublisher())
        with app.extensions["torchyard"].sessions() as session:
            token = create_api_key(session, "bench", "bench")
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        tiny = Path(folder) / "tiny.csv"
        tiny.write_text("a,b,label\n1,2,0\n3,4,1\n")
        warm = post_file(server.server_port, token, tiny, "tiny.csv")
        before = reset_peak()
        started = time.perf_counter()
        status, body = post_file(server.server_port, token, path, "big.csv")
        seconds = time.perf_counter() - started
        after = memory_kib("VmHWM")
        server.shutdown()
        app.extensions["torchyard"].engine.dispose()
    return {"what": "upload", "warm_status": warm[0], "status": status, "body": body.decode()[:500],
            "size": path.stat().st_size, "before_kib": before, "after_kib": after, "seconds": seconds}


def measure_loadtxt(path: Path) -> dict:
    """numpy.loadtxt of the whole file: the plain way to read it."""
    import numpy as np

    before = reset_peak()
    started = time.perf_counter()
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    seconds = time.perf_counter() - started
    return {"what": "loadtxt", "status": table.shape[0], "size": path.stat().st_size, "before_kib": before,
            "after_kib": memory_kib("VmHWM"), "seconds": seconds}


def run_measurement(what: str, path: Path) -> dict:
    """One measurement in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), "--measure", what, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=11)
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "FILE"), help="upload|loadtxt FILE: one, as JSON")
    args = parser.parse_args()
    if args.measure:
        what, path = args.measure
        result = (measure_upload if what == "upload" else measure_loadtxt)(Path(path))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="torchyard-bench-") as folder:
        path = Path(folder) / "big.csv"
        size = write_csv(path, args.rows, args.columns)
        print(f"{args.rows} rows × {args.columns} columns: {size / 1e6:.1f} MB")
        results = {what: run_measurement(what, path) for what in ("loadtxt", "upload")}
    print(f"{'':10} {'status':>8} {'resident':>12} {'peak after':>12} {'growth':>10} {'growth/size':>12} "
          f"{'seconds':>8}")
    for what, result in results.items():
        growth = (result["after_kib"] - result["before_kib"]) * 1024
        print(f"{what:10} {result['status']:>8} {result['before_kib'] / 1024:>10.0f} MB "
              f"{result['after_kib'] / 1024:>10.0f} MB {growth / 1e6:>7.0f} MB {growth / size:>12.2f} "
              f"{result['seconds']:>8.2f}")
    upload, baseline = results["upload"], results["loadtxt"]
    growth = {what: max(1, result["after_kib"] - result["before_kib"]) for what, result in results.items()}
    print(f"upload / loadtxt: time {upload['seconds'] / baseline['seconds']:.2f}, "
          f"memory growth {growth['upload'] / growth['loadtxt']:.2f}")


if __name__ == "__main__":
    main()
