"""The memory budget: a job's estimated peak (models.memory) holds within a factor of 2 of a real run's, the API
refuses a job over max_job_memory with the estimate and the limit, and a worker fails a job its device can't hold.

Run as a script, this file measures peaks: ``python tests/test_memory_estimate.py SPECS_JSON`` imports the
engine once, then forks a fresh process per spec that trains one warm-up job (a worker's first job loads
libraries: torch._dynamo alone is ~175 MB), notes its peak RSS, trains the spec and reports how much the
peak grew (on a GPU: torch.cuda.max_memory_allocated). The parent never runs a torch operation, so its
children fork clean, as a Celery pool's do.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from models.catalog import DataShape
from models.memory import PROCESS_OVERHEAD, estimate_memory, format_bytes, sklearn_shape
from models.spec import Limits, SpecError
from models.tables import Job, utcnow
from models.validation import parse_spec

ROOT = Path(__file__).resolve().parent.parent
JOBS = "/api/v1/jobs"


def sklearn_spec(name: str, params: dict, layers: list[dict], task: str, batch_size: int, **data) -> dict:
    return {"task": task, "seed": 0, "data": {"source": "sklearn", "name": name, "params": params, **data},
            "model": {"layers": layers}, "training": {"epochs": 1, "batch_size": batch_size}}


def linear(width: int) -> dict:
    return {"type": "Linear", "out_features": width}


RELU = {"type": "ReLU"}

# Each spec's own memory is 100-300 MB, well above how much the same run's peak varies (tens of MB: the C
# allocator's heap), and each trains in a few seconds on a busy 2-core machine.
TABLE = {
    # Weights, their gradients, Adam's two moments and its step: 5.2M parameters.
    "MLP": sklearn_spec("make_classification", {"n_samples": 500, "n_features": 500, "random_state": 0},
                        [linear(2048), RELU, linear(2048), RELU, linear(1)], "binary", 100),
    # Activations of a convolution (16 × 32 × 32 a sample) in training, then evaluated 400 at a time.
    "CNN": sklearn_spec("make_classification", {"n_samples": 2000, "n_features": 1024, "n_informative": 10,
                                                "n_classes": 10, "random_state": 0},
                        [{"type": "Conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1}, RELU,
                         {"type": "MaxPool2d", "kernel_size": 2}, {"type": "Flatten"}, linear(10)],
                        "multiclass", 256, image_shape=[1, 32, 32]),
    # One batch of 20,000 samples through two hidden layers of 512.
    "large batch": sklearn_spec("make_regression", {"n_samples": 25000, "n_features": 50, "random_state": 0},
                                [linear(512), RELU, linear(512), RELU, linear(1)], "regression", 20000),
    # 150,000 × 100 values: generated as float64, copied to float32 and split, shuffled each epoch.
    "large dataset": sklearn_spec("make_regression", {"n_samples": 150_000, "n_features": 100, "random_state": 0},
                                  [linear(1)], "regression", 1024),
    # A file read from its NPZ members: Conv1d, BatchNorm, Dropout's masks, standardized, SGD with momentum.
    "NPZ file": {"task": "regression", "seed": 0,
                 "data": {"source": "file", "path": "NPZ_PATH", "image_shape": [4, 16], "standardize": True},
                 "model": {"layers": [{"type": "Conv1d", "out_channels": 32, "kernel_size": 3, "padding": 1},
                                      {"type": "BatchNorm1d"}, RELU, {"type": "Dropout", "p": 0.2},
                                      {"type": "Flatten"}, linear(1)]},
                 "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9},
                 "training": {"epochs": 1, "batch_size": 4096}},
}
NPZ_ROWS, NPZ_FEATURES = 40_000, 64


# --- the estimate against measured peaks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Each spec of TABLE (the NPZ one pointing at a file written here) with what measuring it found."""
    folder = tmp_path_factory.mktemp("memory")
    path = folder / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.standard_normal((NPZ_ROWS, NPZ_FEATURES)), y=rng.standard_normal(NPZ_ROWS))
    specs = {name: json.loads(json.dumps(spec).replace("NPZ_PATH", str(path))) for name, spec in TABLE.items()}
    # NVML answers torch.cuda.is_available() in the parent, so that CUDA stays free to start in the children.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    run = subprocess.run([sys.executable, __file__, json.dumps(specs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.splitlines()[-1])
    return {name: (specs[name], measured[name]) for name in specs}


def estimated(spec: dict, device: str) -> int:
    """What the estimate says the run adds to a warmed-up process: on a GPU the device's peak, on the CPU the
    peak without the process itself."""
    parsed = parse_spec(spec)
    shape = sklearn_shape(parsed)
    source = None
    if shape is None:
        shape, source = DataShape(NPZ_ROWS, NPZ_FEATURES), "npz"
    estimate = estimate_memory(parsed, shape, source)
    return estimate.device if device == "cuda" else estimate.total - estimate.overhead


@pytest.mark.parametrize("name", list(TABLE))
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(table, name):
    spec, measured = table[name]
    assert measured["status"] == "succeeded", measured
    estimate = estimated(spec, measured["device"])

    ratio = estimate / measured["peak"]
    assert 0.5 <= ratio <= 2, (f"{name}: estimated {format_bytes(estimate)}, measured "
                               f"{format_bytes(measured['peak'])} on {measured['device']} (ratio {ratio:.2f})")


# --- refused before anything is stored --------------------------------------------------------------------

# Each is within the parameter, layer and sample limits: only its memory is too much.
PROBES = {
    # 22 parameters: a convolution padded to 40,006 × 40,006 pixels, pooled down to one.
    "padded convolution": (sklearn_spec(
        "make_classification", {"n_samples": 100, "n_features": 64, "random_state": 0},
        [{"type": "Conv2d", "out_channels": 2, "kernel_size": 3, "padding": 20000},
         {"type": "MaxPool2d", "kernel_size": 40006}, {"type": "Flatten"},
         {"type": "Linear", "out_features": 1, "bias": False}], "binary", 32, image_shape=[1, 8, 8]),
        "model.layers[0]"),
    # 3·10^9 float64 values to generate: 22 GiB before the float32 copies.
    "huge dataset": (sklearn_spec("make_regression", {"n_samples": 1_000_000, "n_features": 3000}, [linear(1)],
                                  "regression", 32), "data.params.n_samples"),
    # 4·10^7 parameters, under the limit, but 10^7 activations a sample in batches of 800,000.
    "wide layer, huge batch": (sklearn_spec("make_regression", {"n_samples": 1_000_000, "n_features": 2},
                                            [linear(10_000_000), RELU, linear(1)], "regression", 1_000_000),
                               "model.layers[0]"),
}


def refusal(spec: dict, shape: DataShape, limit: str = "4 GiB", source: str | None = None) -> str:
    """The start and the end of the message a job over the memory limit gets."""
    estimate = estimate_memory(parse_spec(spec, Limits(max_job_memory=2**62)), shape, source)
    return f"the job needs an estimated {format_bytes(estimate.total)} of memory", \
        f"over the limit of {limit} (max_job_memory)"


def jobs_stored(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_job_over_the_memory_limit_is_refused_naming_the_estimate_and_the_limit(
        client, alice, sessions, published, probe):
    spec, field = PROBES[probe]

    response = client.post(JOBS, json=spec, headers=alice)

    assert response.status_code == 422, response.json
    [problem] = response.json["errors"]
    assert problem["path"] == field
    start, end = refusal(spec, sklearn_shape(parse_spec(spec, Limits(max_job_memory=2**62))))
    assert problem["message"].startswith(start) and problem["message"].endswith(end)
    assert jobs_stored(sessions) == 0 and published == []


def test_a_job_on_an_uploaded_dataset_is_held_to_the_memory_limit_too(client, alice, sessions, published):
    rows = "\n".join(",".join(["0.5"] * 64 + [str(i % 2)]) for i in range(100))
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    upload = client.post("/api/v1/datasets", headers=alice, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(f"{header}\n{rows}\n".encode()), "pixels.csv")})
    assert upload.status_code == 201, upload.json
    spec, _ = PROBES["padded convolution"]
    spec = {**spec, "data": {"source": "dataset", "dataset_id": upload.json["id"], "image_shape": [1, 8, 8]}}

    response = client.post(JOBS, json=spec, headers=alice)

    assert response.status_code == 422, response.json
    [problem] = response.json["errors"]
    assert problem["path"] == "model.layers[0]"
    start, end = refusal(spec, DataShape(100, 64, 1, 2), source="csv")
    assert problem["message"].startswith(start) and problem["message"].endswith(end)
    assert jobs_stored(sessions) == 0 and published == []


def test_the_limit_is_the_deployments_setting(make_app, alice_of, sessions_of):
    spec = sklearn_spec("make_moons", {"n_samples": 200, "random_state": 0}, [linear(8), RELU, linear(1)],
                        "binary", 50)
    roomy, tight = make_app(), make_app(max_job_memory=PROCESS_OVERHEAD)  # the process alone fills it

    assert roomy.test_client().post(JOBS, json=spec, headers=alice_of(roomy)).status_code == 201
    response = tight.test_client().post(JOBS, json=spec, headers=alice_of(tight))
    assert response.status_code == 422
    assert response.json["errors"][0]["message"].endswith("over the limit of 1 GiB (max_job_memory)")
    assert jobs_stored(sessions_of(tight)) == 1  # roomy's
    from models.settings import Settings

    settings = Settings.from_env({"TORCHYARD_MAX_JOB_MEMORY": "3000000000", "TORCHYARD_WORKER_MEMORY": "2000000000"})
    assert (settings.limits.max_job_memory, settings.worker_memory) == (3_000_000_000, 2_000_000_000)


@pytest.fixture
def sessions_of():
    return lambda app: app.extensions["torchyard"].sessions


@pytest.fixture
def alice_of(sessions_of):
    """Headers of a user with a key on ``app``'s database (the apps of a test share one)."""
    from api.auth import create_api_key

    def alice_of(app) -> dict[str, str]:
        with sessions_of(app)() as session:
            return {"Authorization": f"Bearer {create_api_key(session, 'alice', 'test')}"}

    return alice_of


# --- a worker checks its own device ------------------------------------------------------------------------

# 20,000 × 201 values: reading them takes 61 MiB, on top of the process.
BIG_DATA = sklearn_spec("make_regression", {"n_samples": 20_000, "n_features": 200, "random_state": 0}, [linear(1)],
                        "regression", 256)


def test_a_worker_with_less_memory_than_the_job_needs_fails_it_saying_so(worker_context, monkeypatch):
    from models.tables import Artifact, User
    from worker import runner

    small = PROCESS_OVERHEAD + (8 << 20)  # room for the process, not for the data
    ctx = dataclasses.replace(worker_context, settings=worker_context.settings.model_copy(
        update={"worker_memory": small}))
    monkeypatch.setattr(runner, "context", lambda: ctx)
    with ctx.sessions() as session:
        user = User(name="alice")
        session.add(user)
        session.flush()
        job = Job(user_id=user.id, name="big", spec=BIG_DATA, epochs=1, released_at=utcnow())
        session.add(job)
        session.commit()
        job_id = job.id

    assert runner.run_job(job_id) == "failed"
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        artifacts = session.scalar(select(func.count()).select_from(Artifact))
    estimate = estimate_memory(parse_spec(BIG_DATA), sklearn_shape(parse_spec(BIG_DATA)))
    assert job.error == (f"data.params.n_samples: the job needs an estimated {format_bytes(estimate.total)} of "
                         f"memory ({estimate.largest_parts()}; batch size 256), more than this worker's 1.01 GiB "
                         "of memory")
    assert estimate.largest_parts().startswith("reading the data 61.3 MiB")
    assert (job.status, job.attempts, artifacts) == ("failed", 1, 0)


def test_the_worker_measures_its_device_and_reads_a_files_shape_from_its_header(tmp_path):
    from worker.engine.memory import check_memory, file_shape, host_memory

    assert 0 < host_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    estimate = check_memory(parse_spec(BIG_DATA), "cpu")  # this machine holds it
    assert estimate.total == estimate_memory(parse_spec(BIG_DATA), sklearn_shape(parse_spec(BIG_DATA))).total
    with pytest.raises(SpecError, match="more than this worker's 1 GiB of memory"):
        check_memory(parse_spec(BIG_DATA), "cpu", memory=PROCESS_OVERHEAD)

    np.savez(tmp_path / "d.npz", X=np.zeros((30, 2, 4)), y=np.zeros((30, 3)))
    (tmp_path / "d.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    npz = parse_spec({**BIG_DATA, "data": {"source": "file", "path": str(tmp_path / "d.npz")}})
    assert file_shape(npz, tmp_path / "d.npz") == (DataShape(30, 8, 3, None), "npz")
    assert file_shape(npz, tmp_path / "d.csv") == (DataShape(2, 2, 1, None), "csv")


# --- measuring (this file as a script) ----------------------------------------------------------------------


def measure_peaks(specs: dict[str, dict]) -> dict[str, dict]:
    """Fork a fresh process per spec (this one has imported the engine, and run nothing); collect each peak."""
    import torch._dynamo  # noqa: F401 - the first optimizer step imports it: once here, not in each child

    import worker.engine  # noqa: F401

    results = {}
    for name, spec in specs.items():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, and leave without cleanup
            os.close(read)
            try:
                report = measure_one(spec)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                report = {"status": "crashed", "error": repr(exc)}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            results[name] = json.loads(pipe.read() or '{"status": "no report"}')
        os.waitpid(pid, 0)
    return results


def measure_one(spec: dict) -> dict:
    """Train a tiny job, then ``spec``; how much the peak grew with ``spec`` (RSS, or CUDA allocations)."""
    import resource
    import tempfile
    import time

    import torch

    import worker.engine as engine

    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warm_up = sklearn_spec("make_regression", {"n_samples": 64, "n_features": 4}, [linear(1)], "regression", 32)
    with tempfile.TemporaryDirectory() as folder:
        engine.train(parse_spec(warm_up), Path(folder), device=device)
    # ru_maxrss counts KiB on Linux (bytes on macOS).
    unit = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        result = engine.train(parse_spec(spec), Path(folder), device=device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - before
    return {"status": result.status, "error": result.error, "device": device, "peak": peak,
            "seconds": round(time.monotonic() - started, 1)}


if __name__ == "__main__":
    print(json.dumps(measure_peaks(json.loads(sys.argv[1]))))
