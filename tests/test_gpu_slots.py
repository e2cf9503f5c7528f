"""GPU slots and routing: a worker with N GPUs runs N // gpus_per_slot jobs at once, each pool process pinned
to its own GPUs; a job needing k GPUs goes to queue gpu.k and waits, saying why, until a worker that holds k
GPUs a slot is live. This machine has no CUDA, so the GPUs are simulated by configuration
(TORCHYARD_WORKER_GPUS): jobs with device "auto" train on the CPU inside their pinned slot, and jobs that
insist on "cuda" fail saying the machine has none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REDIS_SCALE_URL, Service, WorkerProcess, production_settings, wait_for

from models.queues import QUEUES, gpu_queue, queue_for, queue_gpus
from models.settings import Settings
from models.spec import Resources
from worker import gpus

SMALL = {
    "name": "slot",
    "seed": 0,
    "task": "binary",
    "data": {"source": "sklearn", "name": "make_moons",
             "params": {"n_samples": 300, "noise": 0.2, "random_state": 0}},
    "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "Tanh"},
                         {"type": "Linear", "out_features": 1}]},
    "training": {"epochs": 60, "batch_size": 30},
}
NO_CUDA = "resources.device: 'cuda' was asked for but this machine has none"


def with_resources(**resources) -> dict:
    return {**SMALL, "resources": resources}


# --- routing and plans, no processes --------------------------------------------------------------


@pytest.mark.parametrize(("resources", "queue"), [
    ({}, "cpu"), ({"device": "cpu", "processes": 2}, "cpu"), ({"device": "cuda"}, "gpu"),
    ({"device": "cuda", "gpus": 1}, "gpu"), ({"gpus": 2}, "gpu.2"), ({"device": "cuda", "gpus": 4}, "gpu.4"),
])
def test_a_job_goes_to_the_queue_of_the_gpus_it_needs(client, alice, spec, published, live_worker, resources, queue):
    response = client.post("/api/v1/jobs", json={**spec, "resources": resources}, headers=alice)

    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["queue"] == queue and published == [(job["id"], queue)]


def test_every_queue_a_spec_can_name_is_a_queue_workers_can_serve():
    for count in range(1, 65):
        queue = queue_for(Resources(device="cuda", gpus=count))
        assert queue in QUEUES and queue_gpus(queue) == count
    assert queue_for(Resources()) == "cpu" and queue_gpus("cpu") == 0
    with pytest.raises(ValueError, match="unknown queue 'gpu.65'"):
        queue_gpus("gpu.65")


def test_slots_cut_the_gpus_into_groups_of_gpus_per_slot(monkeypatch):
    monkeypatch.delenv(gpus.VISIBLE, raising=False)
    plan = gpus.make_plan(Settings(worker_gpus=5, worker_gpus_per_slot=2), detected=0)

    assert (plan.gpus, plan.slots) == (("0", "1", "2", "3", "4"), 2)
    assert [plan.slot_gpus(0), plan.slot_gpus(1)] == [("0", "1"), ("2", "3")]
    assert gpus.gpu_slots(plan, ["gpu.2"]) == 2 and gpus.gpu_slots(plan, ["gpu", "gpu.2"]) == 2
    assert gpus.gpu_slots(plan, ["cpu"]) is None  # a CPU worker: its concurrency setting stands
    devices = gpus.registry_devices(plan)
    assert (devices["cuda"], devices["gpus_per_slot"]) == (5, 2)
    assert [(d["id"], d["slot"], d["simulated"]) for d in devices["gpus"]] == [
        ("0", 0, True), ("1", 0, True), ("2", 1, True), ("3", 1, True), ("4", None, True)]


def test_real_gpus_are_listed_with_the_name_and_memory_torch_reports(monkeypatch):
    # torch.cuda.get_device_properties runs in a subprocess (CUDA stays uninitialised in the worker that
    # forks); here a stand-in script prints what it would for one GPU.
    monkeypatch.setattr(gpus, "_PROPERTIES", "print('[{\"name\": \"NVIDIA H100\", \"memory_bytes\": 85}]')")
    monkeypatch.setenv(gpus.VISIBLE, "3")
    plan = gpus.make_plan(Settings(), detected=1)

    assert gpus.registry_devices(plan)["gpus"] == [{"id": "3", "slot": 0, "name": "NVIDIA H100", "memory_bytes": 85}]
    monkeypatch.setattr(gpus, "_PROPERTIES", "raise SystemExit(1)")  # torch can't tell: listed, unnamed
    assert gpus.registry_devices(plan)["gpus"] == [{"id": "3", "slot": 0, "name": None, "memory_bytes": None}]


def test_a_worker_s_gpus_are_the_ones_it_was_given(monkeypatch):
    monkeypatch.setenv(gpus.VISIBLE, "3,5,6")
    plan = gpus.make_plan(Settings(), detected=3)  # "auto": all it sees

    assert (plan.gpus, plan.slots, plan.slot_gpus(2)) == (("3", "5", "6"), 3, ("6",))
    assert gpus.make_plan(Settings(worker_gpus=2), detected=3).gpus == ("3", "5")
    with pytest.raises(ValueError, match="TORCHYARD_WORKER_GPUS=4 but this machine has 3 CUDA device"):
        gpus.make_plan(Settings(worker_gpus=4), detected=3)


@pytest.mark.parametrize(("fields", "queues", "message"), [
    ({}, ["gpu"], "queue(s) gpu need GPUs, but this worker has none"),
    ({"worker_gpus": 1, "worker_gpus_per_slot": 2}, ["gpu.2"], "1 GPU(s) are fewer than one slot's 2"),
    ({"worker_gpus": 4}, ["cpu", "gpu.2"], "queue gpu.2 is for jobs needing 2 GPUs, but a slot of this worker holds 1"),
])
def test_a_gpu_queue_the_worker_cannot_hold_a_job_of_is_refused(monkeypatch, fields, queues, message):
    monkeypatch.delenv(gpus.VISIBLE, raising=False)
    plan = gpus.make_plan(Settings(**fields), detected=0)

    with pytest.raises(ValueError) as refused:
        gpus.gpu_slots(plan, queues)
    assert message in str(refused.value)


def test_a_pinned_slot_sets_cuda_visible_devices_and_labels_the_device(monkeypatch):
    monkeypatch.setenv(gpus.VISIBLE, "")  # so that the test's pinning is undone afterwards
    monkeypatch.setattr(gpus, "_plan", gpus.make_plan(Settings(worker_gpus=4, worker_gpus_per_slot=2), detected=0))
    monkeypatch.setattr(gpus, "_slot", None)
    assert gpus.device_label("cpu") == "cpu"  # not a GPU worker's pool process: as before

    assert gpus.pin_slot(1) == ("2", "3")

    assert os.environ[gpus.VISIBLE] == "2,3"
    assert gpus.device_label("cuda") == "cuda (CUDA_VISIBLE_DEVICES=2,3)"
    assert gpus.device_label(None) == "none (CUDA_VISIBLE_DEVICES=2,3)"
    monkeypatch.setattr(gpus, "_slot", tuple(f"GPU-{i:032x}" for i in range(8)))  # UUIDs: long names
    assert len(gpus.device_label("cuda")) == gpus.MAX_DEVICE_LABEL


# --- real workers over PostgreSQL and Redis, with simulated GPUs ------------------------------------


@pytest.fixture(scope="module")
def gpu_deployment(tmp_path_factory):
    """PostgreSQL and Redis (db 10), the API, and a worker on a simulated 2-GPU machine serving ``gpu``."""
    home = tmp_path_factory.mktemp("home")
    with production_settings(home, REDIS_SCALE_URL.rsplit("/", 1)[0] + "/10") as settings:
        service = Service(settings)
        try:
            start(service, settings.model_copy(update={"worker_gpus": 2}), ("gpu",), "two-gpus")
            yield service
        finally:
            service.close()


def start(service: Service, settings, queues, name: str) -> WorkerProcess:
    worker = WorkerProcess(settings, queues, name=name)
    service.workers.append(worker)
    worker.wait_registered(service.sessions)
    return worker


def registry(service: Service) -> dict[str, dict]:
    """The live workers in detail, as an admin sees them."""
    from models import accounts

    with service.sessions() as session:
        if accounts.find_user(session, "operator") is None:
            accounts.create_user(session, "operator", role="admin")
        headers = {"Authorization": f"Bearer {accounts.create_api_key(session, 'operator', 'registry')}"}
    response = service.client.get("/api/v1/workers", headers=headers)
    assert response.status_code == 200
    return {worker["id"]: worker for worker in response.get_json()["workers"]}


def test_the_registry_lists_the_simulated_gpus_and_one_slot_each(gpu_deployment):
    (worker,) = registry(gpu_deployment).values()

    assert worker["queues"] == ["gpu"] and worker["slots"] == 2
    devices = worker["devices"]
    assert (devices["cuda"], devices["gpus_per_slot"], devices["cpu"] >= 1) == (2, 1, True)
    assert devices["gpus"] == [
        {"id": "0", "slot": 0, "name": "simulated", "memory_bytes": None, "simulated": True},
        {"id": "1", "slot": 1, "name": "simulated", "memory_bytes": None, "simulated": True}]


def test_two_jobs_run_at_once_each_in_its_own_slot_pinned_to_its_own_gpu(gpu_deployment):
    service = gpu_deployment
    jobs = [service.submit({**with_resources(gpus=1), "name": f"slot-{i}"}) for i in range(2)]

    service.wait_for(lambda: all(service.job(j)["status"] == "running" for j in jobs), 60, "both jobs running")
    finished = [service.wait_status(j, timeout=120) for j in jobs]

    assert [job["status"] for job in finished] == ["succeeded", "succeeded"], finished
    assert {job["queue"] for job in finished} == {"gpu"}
    (worker_id,) = registry(service)
    assert {job["worker_id"] for job in finished} == {worker_id}
    # "auto" found no CUDA in the slot and trained on the CPU; the slot's GPU is what the job saw
    assert sorted(job["device"] for job in finished) == ["cpu (CUDA_VISIBLE_DEVICES=0)",
                                                         "cpu (CUDA_VISIBLE_DEVICES=1)"]


def test_a_cuda_job_on_a_machine_without_cuda_fails_saying_so(gpu_deployment):
    service = gpu_deployment
    job = service.wait_status(service.submit(with_resources(device="cuda")))

    assert (job["status"], job["error"], job["queue"]) == ("failed", NO_CUDA, "gpu")
    assert job["worker_id"] and job["device"] in ("none (CUDA_VISIBLE_DEVICES=0)", "none (CUDA_VISIBLE_DEVICES=1)")


def test_a_job_needing_more_gpus_than_any_slot_holds_waits_saying_so_until_a_worker_holds_them(gpu_deployment):
    service = gpu_deployment
    job_id = service.submit({**with_resources(gpus=2), "training": {"epochs": 5, "batch_size": 30}})
    assert service.job(job_id)["queue"] == gpu_queue(2) == "gpu.2"

    reason = "no live worker serves queue 'gpu.2' (jobs needing 2 GPUs)"
    service.wait_for(lambda: service.job(job_id)["pending_reason"] == reason, 30, "the pending reason")
    assert service.job(job_id)["status"] == "queued"

    pair = start(service, service.settings.model_copy(update={"worker_gpus": 2, "worker_gpus_per_slot": 2}),
                 ("gpu.2",), "gpu-pair")
    job = service.wait_status(job_id, timeout=120)

    assert job["status"] == "succeeded", job
    assert job["pending_reason"] is None and job["attempts"] == 1
    assert job["worker_id"] == pair.worker_id
    assert job["device"] == "cpu (CUDA_VISIBLE_DEVICES=0,1)"  # both ranks' GPUs: a 2-process DDP run
    listed = registry(service)[pair.worker_id]
    assert (listed["queues"], listed["slots"], listed["devices"]["gpus_per_slot"]) == (["gpu.2"], 1, 2)


@pytest.mark.parametrize(("fields", "queues", "message"), [
    ({"worker_gpus": 0}, ("gpu",), "queue(s) gpu need GPUs, but this worker has none"),
    ({"worker_gpus": 2}, ("gpu.2",), "queue gpu.2 is for jobs needing 2 GPUs, but a slot of this worker holds 1"),
])
def test_a_worker_that_cannot_hold_its_queue_s_jobs_does_not_start(gpu_deployment, fields, queues, message):
    settings = gpu_deployment.settings.model_copy(update=fields)
    worker = WorkerProcess(settings, queues, name=f"refused-{queues[0]}")

    rc = worker.process.wait(60)

    assert rc != 0
    assert f"torchyard worker can't start: {message}" in worker.log(), worker.log()
    assert not [i for i in registry(gpu_deployment) if i.endswith(f":{worker.process.pid}")]  # never registered


def test_a_replaced_pool_process_takes_over_the_slot_and_gpu_of_the_one_it_replaces(gpu_deployment):
    import signal

    (worker,) = [w for w in gpu_deployment.workers if w.log_path.name == "two-gpus.log"]

    def pinned() -> dict[int, str]:
        lines = [line.split("pool process ", 1)[1] for line in worker.log(10_000).splitlines()
                 if "pool process " in line and gpus.VISIBLE in line]
        return {int(pid): value for pid, value in (line.split(f": {gpus.VISIBLE}=") for line in lines)}

    main = worker.process.pid
    children = {int(pid) for pid in Path(f"/proc/{main}/task/{main}/children").read_text().split()}
    before = {pid: value for pid, value in pinned().items() if pid in children}
    assert sorted(before.values()) == ["0", "1"]
    (victim,) = [pid for pid, value in before.items() if value == "1"]

    os.kill(victim, signal.SIGKILL)

    replacement = wait_for(lambda: {pid: v for pid, v in pinned().items() if pid not in before}, 60,
                           "a replacement pool process", worker.log)
    assert list(replacement.values()) == ["1"]
    job = gpu_deployment.wait_status(gpu_deployment.submit({**with_resources(device="cuda"), "name": "after"}))
    assert job["error"] == NO_CUDA  # the worker still runs jobs in its slots
