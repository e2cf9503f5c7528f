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
    """A search over the csv-moons example (its data a local CSV file, its path made absolute): 3 trials of at
    most 3 epochs, ASHA's rungs at epochs 1 and 3; written beside the test. ``fields`` replace the request's."""
    base = json.loads((EXAMPLES / "csv-moons.json").read_text())
    base["data"]["path"] = str(EXAMPLES / "data/moons.csv")
    request = {"name": "tiny-search", "base": base, "method": "random", "trials": 3, "parallelism": 3,
               "space": {"optimizer.lr": {"log_uniform": [0.001, 0.1]},
                         "model.layers[0].out_features": {"choice": [8, 32]}},
               "metric": "val_accuracy", "mode": "max",
               "scheduler": {"type": "asha", "min_epochs": 1, "max_epochs": 3, "reduction_factor": 3}, **fields}
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
    # ASHA with η = 3 over 3 trials: the best at epoch 1 goes on to epoch 3, the other two are pruned there.
    assert (sweep["status"], sweep["counts"]["succeeded"], sweep["counts"]["pruned"]) == ("succeeded", 1, 2)
    for trial in trials:  # each trial ran on the dataset uploaded for the base
        data = api.job(trial["job_id"])["spec"]["data"]
        assert (data["source"], data["dataset_id"]) == ("dataset", uploaded[1])
    # Each trial's state as it changed, the counts whenever they changed, then the ending and the download.
    for trial in trials:
        said = [line for line in lines if line.startswith(f"trial {trial['number']} ")]
        assert said and said[-1] == show.trial_line(trial, "val_accuracy"), said
        assert said[-1].split()[2:4] == [trial["state"], "epoch"] and len(said) == len(set(said))
    assert lines[-3] == f"trials 3/3 created: {show.counts_text(sweep['counts'])}; best {show.sweep_best_text(sweep)}"
    assert lines[-2] == show.sweep_ending(sweep)
    assert lines[-1] == f"download the best: torchyard download {sweep['best']['job_id']} --out runs/tiny-search"

    status = cli("sweep", "status", sweep_id)
    assert status.returncode == 0, status.stderr
    best = sweep["best"]
    assert status.stdout.splitlines()[:8] == [
        f"sweep      {sweep_id}  tiny-search", "status     succeeded", "method     random, 3 trials (3 created), "
        "parallelism 3", "metric     val_accuracy (max)", "scheduler  asha: rungs at epochs 1, 3, reduction factor 3",
        f"trials     {show.counts_text(sweep['counts'])}", f"best       val_accuracy {best['value']:.4g} by job "
        f"{best['job_id']}", f"params     {show.params_text(best['params'])}"]
    assert json.loads(cli("sweep", "status", sweep_id, "--json").stdout) == sweep

    table = cli("sweep", "trials", sweep_id).stdout.splitlines()
    assert table[0].split() == ["#", "JOB", "STATE", "EPOCH", "RUNG", "VAL_ACCURACY", "optimizer.lr",
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
    bad = tiny_sweep(tmp_path, space={"optimizer.lrr": {"log_uniform": [0.001, 0.1]}}, metric="val_r2")
    request = json.loads(bad.read_text())
    fresh = tmp_path / "moons.csv"  # a file no dataset holds yet: uploaded for the submit
    fresh.write_text((EXAMPLES / "data/moons.csv").read_text() + "0.5,0.5,1\n")
    request["base"]["data"]["path"] = "moons.csv"  # relative to the request's file
    bad.write_text(json.dumps(request))
    refused = cli("sweep", "submit", str(bad))
    assert (refused.returncode, refused.stdout) == (1, "")
    dataset = re.match(r"uploaded moons.csv as dataset (ds_\w+);", refused.stderr)[1]
    assert refused.stderr.splitlines()[1:] == [
        f"deleted dataset {dataset} again, uploaded for this submit, which failed",
        "Error: 422 Invalid sweep",  # each field at fault once, by its path in the request
        "  space.optimizer.lrr: no field 'lrr' in the base spec's optimizer (did you mean 'lr'?); it has: type, lr, "
        "betas, eps, weight_decay, amsgrad",
        "  metric: 'val_r2' is not a metric this job records; allowed: accuracy, epoch_seconds, loss, lr, "
        "samples_per_second, val_accuracy, val_loss"]
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
    assert followed.returncode == 1 and followed.stdout.splitlines()[-1] == "sweep cancelled: 3 cancelled"
    assert cli("sweep", "delete", sweep_id).returncode == 0


def test_trials_rank_best_first_by_the_sweep_s_mode_with_no_value_last_and_ties_by_number():
    trials = [{"number": n, "value": value} for n, value in [(0, 0.5), (1, None), (2, 0.9), (3, 0.5), (4, 0.1)]]
    assert [t["number"] for t in show.ranked_trials(trials, "max")] == [2, 0, 3, 4, 1]
    assert [t["number"] for t in show.ranked_trials(trials, "min")] == [4, 0, 3, 2, 1]
