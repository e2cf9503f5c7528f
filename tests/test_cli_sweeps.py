"""`torchyard sweep` against the real API over real HTTP and a real worker: a tiny ASHA sweep over a local CSV
file submitted and followed to its end (the file uploaded as a dataset), its status, trials, list, cancel and
delete; a refused request said with its field paths; a sweep cancelled while its trials wait."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import running_service, served, worker_settings
from test_cli_people import cli_env, torchyard

from torchyard import show
from torchyard.client import Client

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """An embedded deployment (one worker) and the API served over real HTTP; yields (service, url)."""
    with running_service(worker_settings(tmp_path_factory.mktemp("home"))) as service, served(service.app) as url:
        yield service, url


@pytest.fixture
def cli(service, tmp_path):
    """``torchyard ARGS`` as the deployment's user."""
    deployment, url = service
    env = cli_env(url, deployment.headers["Authorization"].removeprefix("Bearer "), tmp_path)
    return lambda *args: torchyard(*args, env=env)


@pytest.fixture
def api(service) -> Client:
    deployment, url = service
    return Client(url, deployment.headers["Authorization"].removeprefix("Bearer "))


def tiny_sweep(tmp_path, **fields) -> Path:
    """The moons example shrunk: 3 trials of at most 3 epochs, ASHA rungs at epochs 1 and 3 (so one trial goes
    on to epoch 3 and two are pruned at epoch 1); written beside the test, its data path made absolute."""
    request = json.loads((EXAMPLES / "sweeps/moons-search.json").read_text())
    request["base"]["data"]["path"] = str(EXAMPLES / "data/moons.csv")
    request.update(name="tiny-search", trials=3, parallelism=3,
                   space={"optimizer.lr": {"log_uniform": [0.001, 0.1]},
                          "model.layers[0].out_features": {"choice": [8, 32]}},
                   scheduler={"type": "asha", "min_epochs": 1, "max_epochs": 3, "reduction_factor": 3}, **fields)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(request))
    return path


def test_a_sweep_over_a_local_file_is_submitted_followed_to_its_end_listed_shown_and_deleted(cli, api, tmp_path):
    followed = cli("sweep", "submit", str(tiny_sweep(tmp_path)), "--follow")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    lines = followed.stdout.splitlines()
    sweep_id = lines[0]
    assert sweep_id.startswith("swp_")
    uploaded = re.fullmatch(r"uploaded \S+moons.csv as dataset (ds_\w+); submitting with data.dataset_id=\1\n",
                            followed.stderr)
    assert uploaded, followed.stderr

    sweep = api.sweep(sweep_id)
    trials = api.sweep_trials(sweep_id)
    assert sweep["status"] == "succeeded" and sweep["counts"]["succeeded"] == 1 and sweep["counts"]["pruned"] == 2
    assert {trial["state"] for trial in trials} == {"succeeded", "pruned"}
    for trial in trials:  # each trial ran on the dataset uploaded for the base
        data = api.job(trial["job_id"])["spec"]["data"]
        assert (data["source"], data["dataset_id"]) == ("dataset", uploaded[1])
    # Each trial's state as it changed, the counts whenever they changed, then the ending and the download.
    for trial in trials:
        said = [line for line in lines if line.startswith(f"trial {trial['number']} ")]
        assert said and said[-1].split()[2] == trial["state"], said
    assert any(re.match(r"trial \d+  paused ", line) for line in lines)
    assert lines[-3] == f"trials 3/3 created: {show.counts_text(sweep['counts'])}; best {show.sweep_best_text(sweep)}"
    assert lines[-2] == show.sweep_ending(sweep)
    assert lines[-1] == f"download the best: torchyard download {sweep['best']['job_id']} --out runs/tiny-search"

    status = cli("sweep", "status", sweep_id)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[:6] == [
        f"sweep      {sweep_id}  tiny-search", "status     succeeded", "method     random, 3 trials (3 created), "
        "parallelism 3", "metric     val_accuracy (max)", "scheduler  asha: rungs at epochs 1, 3, reduction factor 3",
        "trials     succeeded 1, pruned 2"]
    assert json.loads(cli("sweep", "status", sweep_id, "--json").stdout) == sweep

    table = cli("sweep", "trials", sweep_id).stdout.splitlines()
    assert table[0].split() == ["#", "JOB", "STATE", "EPOCH", "RUNG", "VAL_ACCURACY", "BEST", "optimizer.lr",
                                "model.layers[0].out_features"]
    ranked = show.ranked_trials(trials, "max")
    assert [row.split()[:3] for row in table[1:]] == [[str(t["number"]), t["job_id"], t["state"]] for t in ranked]
    values = [t["value"] for t in ranked]
    assert values == sorted(values, reverse=True)  # best first
    assert json.loads(cli("sweep", "trials", sweep_id, "--json").stdout) == trials

    listed = cli("sweep", "list").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "STATUS", "TRIALS", "BEST", "AGE"]
    assert listed[1].split()[:4] == [sweep_id, "tiny-search", "succeeded", "3/3"]

    ended = cli("sweep", "cancel", sweep_id)
    assert ended.returncode == 1 and ended.stderr.startswith("Error: 409 ")
    deleted = cli("sweep", "delete", sweep_id)
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted {sweep_id}\n")
    gone = cli("sweep", "status", sweep_id)
    assert gone.returncode == 1 and gone.stderr.startswith("Error: 404 ")
    assert cli("sweep", "list").stdout == "no sweeps\n"


def test_a_refused_request_is_said_with_its_field_paths_and_the_dataset_uploaded_for_it_is_deleted(cli, api, tmp_path):
    bad = tiny_sweep(tmp_path, space={"optimizer.lrr": {"log_uniform": [0.001, 0.1]}}, trials=0)
    refused = cli("sweep", "submit", str(bad))
    assert (refused.returncode, refused.stdout) == (1, "")
    assert "space.optimizer.lrr: " in refused.stderr and "\n  trials: " in refused.stderr
    assert "Traceback" not in refused.stderr
    dataset = re.search(r"as dataset (ds_\w+);", refused.stderr)[1]
    assert f"deleted dataset {dataset} again, uploaded for this submit, which failed" in refused.stderr
    assert dataset not in [d["id"] for d in api.datasets()["datasets"]]


def test_cancel_ends_a_sweep_whose_trials_wait_and_a_second_cancel_is_no_error(cli, api, tmp_path):
    # Trials that need a GPU, which this CPU worker never takes: they wait, queued, and cost no training.
    request = json.loads(tiny_sweep(tmp_path).read_text())
    request["base"]["resources"] = {"device": "cuda"}
    waiting = tmp_path / "gpu.json"
    waiting.write_text(json.dumps({**request, "name": "waits-for-a-gpu"}))
    sweep_id = cli("sweep", "submit", str(waiting)).stdout.strip()
    assert api.sweep(sweep_id)["status"] == "running"
    assert {trial["state"] for trial in api.sweep_trials(sweep_id)} == {"queued"}

    assert cli("sweep", "cancel", sweep_id).stdout == f"{sweep_id} cancelled\n"
    assert api.sweep(sweep_id)["status"] == "cancelled"
    assert {trial["state"] for trial in api.sweep_trials(sweep_id)} == {"cancelled"}
    again = cli("sweep", "cancel", sweep_id)
    assert (again.returncode, again.stdout) == (0, f"{sweep_id} was cancelled already\n")
    followed = cli("sweep", "status", sweep_id, "--follow")  # an ended sweep: said at once, exit 1 (not succeeded)
    assert followed.returncode == 1 and followed.stdout.splitlines()[-1].startswith("cancelled: cancelled 3")
    assert cli("sweep", "delete", sweep_id).returncode == 0
