"""Gradient clipping, gradient accumulation, class weights and mixed precision: the numbers a hand-written
PyTorch loop gives on the same data and seed, and a resume that loses none of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification, make_regression
from torch import nn

from models.spec import SpecError
from models.validation import parse_spec
from worker.engine import Callback, StopTraining, train
from worker.engine import precision as precision_module
from worker.engine.run import finish, prepare_run

TIMING = {"epoch_seconds", "samples_per_second"}
N = 200


def regression_spec(**training) -> dict:
    return {
        "seed": 3,
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression", "validation_split": 0.0,
                 "params": {"n_samples": N, "n_features": 5, "noise": 1.0, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 8}, {"type": "Tanh"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9},
        "training": {"epochs": 4, "batch_size": 32, **training},
        "resources": {"device": "cpu"},
    }


def classification_spec(loss: dict, layers_end=(), **training) -> dict:
    return {
        "seed": 5,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0.0,
                 "params": {"n_samples": N, "n_features": 6, "n_informative": 4, "n_classes": 3,
                            "random_state": 1}},
        "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 3}, *layers_end]},
        "loss": loss,
        "optimizer": {"type": "Adam", "lr": 0.01},
        "training": {"epochs": 3, "batch_size": 40, **training},
        "resources": {"device": "cpu"},
    }


def losses_of(result) -> list[float]:
    return [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]


def metrics_without_timing(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]


def regression_data():
    X, y = make_regression(n_samples=N, n_features=5, noise=1.0, random_state=0)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).reshape(-1, 1)


def hand_loop(X, y, model, optimizer, loss_fn, *, seed, epochs, batch_size, accumulate=1, clip=None,
              autocast_dtype=None) -> list[float]:
    """The loop a PyTorch user writes: shuffle, accumulate ``accumulate`` batches weighted by their share of the
    group's samples, clip, step; per-epoch mean loss over samples."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = []
    for _epoch in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        xs, ys = X[order], y[order]
        starts = list(range(0, len(X), batch_size))
        total = 0.0
        for g in range(0, len(starts), accumulate):
            group = starts[g:g + accumulate]
            group_samples = sum(len(xs[s:s + batch_size]) for s in group)
            optimizer.zero_grad()
            for s in group:
                xb, yb = xs[s:s + batch_size], ys[s:s + batch_size]
                if autocast_dtype is None:
                    out = model(xb)
                else:
                    with torch.autocast("cpu", dtype=autocast_dtype):
                        out = model(xb)
                    out = out.float()
                loss = loss_fn(out, yb)
                (loss * (len(xb) / group_samples) if len(group) > 1 else loss).backward()
                total += loss.item() * len(xb)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        per_epoch.append(total / len(X))
    return per_epoch


def hand_regression(**options) -> list[float]:
    X, y = regression_data()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)  # the engine's CPU kernel
    return hand_loop(X, y, model, optimizer, nn.MSELoss(), seed=3, epochs=4, batch_size=32, **options)


# --- clipping -----------------------------------------------------------------------------------


def test_gradient_clipping_equals_a_hand_loop_that_clips_the_global_norm(tmp_path):
    clipped = train(parse_spec(regression_spec(gradient_clip_norm=0.5)), tmp_path / "clipped")
    plain = train(parse_spec(regression_spec()), tmp_path / "plain")
    assert losses_of(clipped) == pytest.approx(hand_regression(clip=0.5), abs=1e-6, rel=1e-6)
    # The clip was in force (gradients of this regression are far above 0.5): it changed the run.
    assert losses_of(clipped) != pytest.approx(losses_of(plain), rel=1e-3)


# --- accumulation -------------------------------------------------------------------------------


def test_accumulation_equals_a_hand_loop_with_a_shorter_last_group(tmp_path):
    # 200 rows in batches of 32: 7 batches (the last of 8 rows), in groups of 4 and then 3 batches.
    result = train(parse_spec(regression_spec(accumulate_batches=4)), tmp_path)
    assert losses_of(result) == pytest.approx(hand_regression(accumulate=4), abs=1e-6, rel=1e-6)


def test_accumulating_n_batches_of_b_equals_one_batch_of_n_times_b(tmp_path):
    # Plain SGD on a mean loss: groups of 4 batches of 30 (and a last group of 30, 30 and 20 rows) must step
    # as batches of 120 (and the last of 80) do, since both shuffle the same order.
    def spec(batch_size, accumulate):
        return parse_spec(regression_spec(batch_size=batch_size, accumulate_batches=accumulate)
                          | {"optimizer": {"type": "SGD", "lr": 0.01}})

    small = train(spec(30, 4), tmp_path / "small")
    big = train(spec(120, 1), tmp_path / "big")
    small_weights = torch.load(tmp_path / "small/checkpoints/epoch-0004.pt", weights_only=True)["model"]
    big_weights = torch.load(tmp_path / "big/checkpoints/epoch-0004.pt", weights_only=True)["model"]
    for name, value in big_weights.items():
        torch.testing.assert_close(small_weights[name], value, rtol=1e-5, atol=1e-6)
    assert losses_of(small) == pytest.approx(losses_of(big), rel=1e-5)


def test_a_per_batch_scheduler_steps_once_per_optimizer_step(tmp_path):
    spec = parse_spec(regression_spec(accumulate_batches=3, epochs=3)
                      | {"scheduler": {"type": "OneCycleLR", "max_lr": 0.05}})
    prepared = prepare_run(spec, tmp_path)
    scheduler = prepared.trainer.scheduler
    assert scheduler.total_steps == 3 * 3  # 7 batches an epoch: groups of 3, 3 and 1
    assert finish(prepared, spec, tmp_path).status == "succeeded"
    assert scheduler.last_epoch == scheduler.total_steps


# --- class weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["CrossEntropyLoss", "NLLLoss"])
def test_class_weights_equal_a_hand_loop_with_the_weighted_loss(tmp_path, loss_type):
    weight = [0.5, 2.0, 4.0]
    layers_end = [{"type": "LogSoftmax", "dim": 1}] if loss_type == "NLLLoss" else []
    weighted = train(parse_spec(classification_spec({"type": loss_type, "weight": weight}, layers_end)),
                     tmp_path / "weighted")
    unweighted = train(parse_spec(classification_spec({"type": loss_type}, layers_end)), tmp_path / "plain")

    X, y = make_classification(n_samples=N, n_features=6, n_informative=4, n_classes=3, random_state=1)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3),
                          *([nn.LogSoftmax(dim=1)] if layers_end else []))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)  # the engine's CPU kernel
    loss_fn = getattr(nn, loss_type)(weight=torch.tensor(weight))
    hand = hand_loop(X, y, model, optimizer, loss_fn, seed=5, epochs=3, batch_size=40)
    assert losses_of(weighted) == pytest.approx(hand, abs=1e-6, rel=1e-6)
    assert losses_of(weighted) != pytest.approx(losses_of(unweighted), rel=1e-3)


def test_class_weights_that_do_not_match_a_file_s_classes_fail_naming_the_field(tmp_path):
    # A local file's classes are known only once it is read: the engine refuses it before training.
    X, y = make_classification(n_samples=60, n_features=4, n_informative=3, n_redundant=0, n_classes=3,
                               random_state=0)
    np.savez(tmp_path / "data.npz", X=X, y=y)
    spec = classification_spec({"type": "CrossEntropyLoss", "weight": [1.0, 2.0]})
    spec["data"] = {"source": "file", "path": str(tmp_path / "data.npz"), "validation_split": 0.0}
    with pytest.raises(SpecError) as refused:
        train(parse_spec(spec), tmp_path / "out")
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("loss.weight", "2 class weights for 3 classes; give one per class")]


# --- precision ----------------------------------------------------------------------------------


def test_bf16_on_the_cpu_equals_a_hand_loop_under_autocast(tmp_path):
    bf16 = train(parse_spec(regression_spec(precision="bf16")), tmp_path / "bf16")
    fp32 = train(parse_spec(regression_spec()), tmp_path / "fp32")
    assert bf16.status == "succeeded"
    assert losses_of(bf16) == pytest.approx(hand_regression(autocast_dtype=torch.bfloat16), abs=1e-6, rel=1e-6)
    assert losses_of(bf16) != losses_of(fp32)  # autocast was on: bfloat16 rounds the forward pass


def test_float16_on_a_device_chosen_at_run_time_that_is_not_cuda_fails_naming_the_field(tmp_path):
    spec = parse_spec(regression_spec(precision="16") | {"resources": {"device": "auto"}})
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 'auto' picks it and float16 trains")
    with pytest.raises(SpecError) as refused:
        train(spec, tmp_path)  # "auto" picks this machine's device
    assert [p.path for p in refused.value.problems] == ["training.precision"]
    assert "needs CUDA" in str(refused.value)


# --- optimizer kernels --------------------------------------------------------------------------


def test_a_fused_adam_run_equals_a_hand_loop_with_fused_adam_and_its_card_says_fused(tmp_path):
    spec = {**regression_spec(), "optimizer": {"type": "Adam", "lr": 0.01}}
    result = train(parse_spec(spec), tmp_path / "adam")
    card = json.loads(result.card_path.read_text())
    assert card["optimizer_implementation"] == "fused"

    X, y = regression_data()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    hand = hand_loop(X, y, model, optimizer, nn.MSELoss(), seed=3, epochs=4, batch_size=32)
    assert losses_of(result) == pytest.approx(hand, abs=1e-6, rel=1e-6)


def test_an_optimizer_without_a_fused_kernel_keeps_the_for_loop_on_the_cpu(tmp_path):
    spec = {**regression_spec(epochs=1), "optimizer": {"type": "RMSprop", "lr": 0.01}}
    card = json.loads(train(parse_spec(spec), tmp_path / "rmsprop").card_path.read_text())
    assert card["optimizer_implementation"] == "for-loop"


# --- resume -------------------------------------------------------------------------------------


def resumable_spec(precision: str = "bf16") -> dict:
    # Dropout, shuffling, a per-batch scheduler, clipping, accumulation and autocast all have to come back
    # exactly for the bytes to match.
    spec = classification_spec({"type": "CrossEntropyLoss", "weight": [1.0, 2.0, 3.0]}, epochs=4,
                               batch_size=20, gradient_clip_norm=1.0, accumulate_batches=3, precision=precision)
    spec["model"]["layers"].insert(2, {"type": "Dropout", "p": 0.2})
    spec["data"]["validation_split"] = 0.2
    spec["scheduler"] = {"type": "OneCycleLR", "max_lr": 0.02}
    return spec


class PreemptAt(Callback):
    """Preempt (checkpoint=True) once, at ``batch`` batches into epoch ``epoch`` (1-based)."""

    def __init__(self, epoch: int, batch: int):
        self.at = (epoch - 1, batch)

    def on_batch_end(self, state):
        if (state.epoch, state.batch) == self.at:
            raise StopTraining("preempted", checkpoint=True)


@pytest.mark.parametrize("batch", [2, 3], ids=["inside-a-group", "at-a-group-boundary"])
def test_a_run_with_every_option_preempted_mid_epoch_resumes_byte_identical(tmp_path, batch):
    spec = parse_spec(resumable_spec())
    whole = train(spec, tmp_path / "whole")
    stopped = train(spec, tmp_path / "parts", callbacks=[PreemptAt(3, batch)])
    assert (stopped.status, stopped.stop_reason) == ("stopped", "preempted")
    checkpoint = torch.load(tmp_path / f"parts/checkpoints/epoch-0002-batch-00000{batch}.pt", weights_only=True)
    # Inside a group the gradient of its batches so far is not yet applied: the checkpoint holds it.
    assert (checkpoint["partial"]["gradient"] is not None) == (batch % 3 != 0)

    resumed = train(spec, tmp_path / "parts", resume=True)
    assert resumed.status == "succeeded"
    assert (tmp_path / "parts/weights.safetensors").read_bytes() == whole.weights_path.read_bytes()
    assert metrics_without_timing(resumed.metrics_path) == metrics_without_timing(whole.metrics_path)


def test_a_resume_without_the_unapplied_gradient_would_differ(tmp_path):
    # The other side of the test above: the saved gradient is what keeps the resume exact.
    spec = parse_spec(resumable_spec())
    whole = train(spec, tmp_path / "whole")
    train(spec, tmp_path / "parts", callbacks=[PreemptAt(3, 2)])
    path = tmp_path / "parts/checkpoints/epoch-0002-batch-000002.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["partial"]["gradient"] = None
    torch.save(checkpoint, path)
    train(spec, tmp_path / "parts", resume=True)
    assert (tmp_path / "parts/weights.safetensors").read_bytes() != whole.weights_path.read_bytes()


def test_float16_s_gradient_scaler_is_kept_through_a_resume(tmp_path, monkeypatch):
    # float16 is for CUDA; this machine's CPU autocasts to float16 too, so the scaler's state (which backs
    # off from 65536 at the first steps, their gradients overflowing) is checked here with the device rule
    # lifted. A resume that started the scaler afresh would skip a step the whole run took.
    monkeypatch.setattr(precision_module, "precision_problem", lambda precision, device: None)
    spec = resumable_spec(precision="16") | {"resources": {"device": "auto"}}
    spec["data"]["params"]["scale"] = 1000.0  # large inputs: large float16 gradients that overflow, scaled
    spec = parse_spec(spec)
    whole = train(spec, tmp_path / "whole", device="cpu")
    train(spec, tmp_path / "parts", device="cpu", callbacks=[PreemptAt(3, 2)])
    checkpoint = torch.load(tmp_path / "parts/checkpoints/epoch-0002-batch-000002.pt", weights_only=True)
    assert checkpoint["precision"]["scaler"]["scale"] < 65536.0
    resumed = train(spec, tmp_path / "parts", device="cpu", resume=True)
    assert resumed.status == "succeeded"
    assert (tmp_path / "parts/weights.safetensors").read_bytes() == whole.weights_path.read_bytes()
    assert metrics_without_timing(resumed.metrics_path) == metrics_without_timing(whole.metrics_path)


# --- data parallel ------------------------------------------------------------------------------


def test_two_gloo_processes_with_accumulation_and_clipping_follow_one_process(tmp_path):
    # Each rank accumulates its shards' gradients (DDP averages them at every backward); the group's step is
    # the same step one process takes on the whole group, to float32 rounding.
    def spec(processes):
        spec = classification_spec({"type": "CrossEntropyLoss"}, epochs=3, batch_size=32, accumulate_batches=3,
                                    gradient_clip_norm=0.5)
        spec["data"]["params"]["n_samples"] = 2 * N
        spec["resources"] = {"device": "cpu", **({"processes": processes} if processes else {})}
        return parse_spec(spec)

    single = train(spec(None), tmp_path / "single")
    double = train(spec(2), tmp_path / "ddp")
    assert double.status == "succeeded", double.error
    assert losses_of(double) == pytest.approx(losses_of(single), rel=1e-4, abs=1e-4)
