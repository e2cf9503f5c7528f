"""End to end over real HTTP: the SDK and the CLI submit, follow, download and load; the service's
results are exactly what the engine gives locally for the same spec and seed.

Runs once on the embedded defaults (SQLite, filesystem broker) and once on PostgreSQL + Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import served

import torchyard
from models.validation import parse_spec
from torchyard.client import ApiError, Client
from worker.engine import train

EXAMPLES = Path(__file__).parent.parent / "examples"
TIMING = {"epoch_seconds", "samples_per_second"}

SPEC = {
    "name": "e2e-moons",
    "seed": 11,
    "task": "binary",
    "data": {"source": "sklearn", "name": "make_moons", "validation_split": 0.25, "standardize": True,
             "params": {"n_samples": 400, "noise": 0.2, "random_state": 3}},
    "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "Tanh"}, {"type": "Dropout", "p": 0.1},
                         {"type": "Linear", "out_features": 1}]},
    "optimizer": {"type": "Adam", "lr": 0.03},
    "scheduler": {"type": "StepLR", "step_size": 3, "gamma": 0.5},
    "training": {"epochs": 6, "batch_size": 32},
    "checkpoint": {"every_n_epochs": 2, "keep_last": 1},
}


@pytest.fixture(params=["embedded", "production"])
def http_service(request):
    """A deployment (one real worker) with its API served over real HTTP; yields (service, client)."""
    service = request.getfixturevalue(f"{request.param}_service")
    token = service.headers["Authorization"].removeprefix("Bearer ")
    with served(service.app) as url:
        yield service, Client(url, token)


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_a_job_over_http_matches_the_engine_run_locally(http_service, tmp_path):
    service, client = http_service
    job = client.submit(SPEC)
    assert job["status"] == "queued" and job["progress"] == {"epoch": 0, "epochs": 6}

    finished = client.wait(job["id"], timeout=120)
    assert finished["status"] == "succeeded", service.log()
    local = train(parse_spec(SPEC), tmp_path / "local")

    # The stored metrics, epoch by epoch, are the local run's.
    served = client.metrics(job["id"])
    assert [row["epoch"] for row in served] == [1, 2, 3, 4, 5, 6]
    local_rows = [json.loads(line) for line in local.metrics_path.read_text().splitlines()]
    assert without_timing(served) == without_timing(local_rows)
    assert client.metrics(job["id"], since_epoch=4) == served[4:]
    assert finished["best"]["epoch"] == local.best_epoch

    # The downloaded model predicts exactly what the locally trained one does.
    bundle = client.download_bundle(job["id"], tmp_path / "downloaded")
    x = torch.randn(50, 2)
    assert torch.equal(torchyard.load_model(bundle)(x), torchyard.load_model(tmp_path / "local")(x))
    assert (bundle / "weights.safetensors").read_bytes() == local.weights_path.read_bytes()
    client.download_weights(job["id"], tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == local.weights_path.read_bytes()


def test_early_stopping_ends_as_success_with_its_reason(http_service):
    _service, client = http_service
    spec = {**SPEC, "name": "e2e-stop", "training": {"epochs": 200, "batch_size": 32},
            "optimizer": {"type": "SGD", "lr": 0.5},
            "early_stopping": {"monitor": "val_loss", "patience": 2, "min_delta": 0.05}}
    job = client.wait(client.submit(spec)["id"], timeout=120)
    assert (job["status"], job["stop_reason"]) == ("succeeded", "early_stopping")
    assert job["progress"]["epoch"] < 200


def test_a_bad_spec_is_a_422_problem_naming_the_field(http_service):
    _service, client = http_service
    before = client.jobs()["jobs"]
    bad = json.loads(json.dumps(SPEC))
    bad["model"]["layers"][0]["type"] = "Linaer"
    with pytest.raises(ApiError) as refused:
        client.submit(bad)
    assert refused.value.status == 422
    assert {"path": "model.layers[0].type", "message": "'Linaer' is not a layer; did you mean 'Linear'?"} in \
        refused.value.problem["errors"]
    assert client.jobs()["jobs"] == before


def test_the_cli_submits_follows_and_downloads(http_service, tmp_path):
    _service, client = http_service
    env = {**os.environ, "TORCHYARD_URL": client.base.removesuffix("/api/v1"), "TORCHYARD_TOKEN": client.token,
           "TORCHYARD_HOME": str(tmp_path / "client-home")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "torchyard.cli", *args], capture_output=True, text=True,
                              env=env, timeout=180)

    submitted = cli("submit", str(EXAMPLES / "circles-mlp.json"), "--follow")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    assert "epoch   1/100  loss" in submitted.stdout
    assert submitted.stdout.splitlines()[-2].startswith("succeeded (early_stopping) after ")
    assert submitted.stdout.splitlines()[-1] == f"download it: torchyard download {job_id} --out runs/circles-mlp"

    assert job_id in cli("list").stdout
    downloaded = cli("download", job_id, "--out", str(tmp_path / "model"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert torchyard.load_model(tmp_path / "model")(torch.zeros(1, 2)).shape == (1, 1)
    missing = cli("status", "job_does_not_exist")
    assert missing.returncode == 1 and "404" in missing.stderr
