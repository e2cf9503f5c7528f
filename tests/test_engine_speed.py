"""What makes the engine fast without changing its numbers: a batch loop that reads nothing back from the
device, and training.compile (torch.compile of the forward pass and the loss)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from models.spec import SpecError
from models.validation import parse_spec
from worker.engine import Callback, StopTraining, TrainResult, train
from worker.engine.run import finish, prepare_run
from worker.runner import closing_line


def small_spec(n_samples: int = 120, compile: bool = False) -> dict:
    return {
        "seed": 4,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0.2,
                 "params": {"n_samples": n_samples, "n_features": 4, "n_informative": 3, "n_redundant": 0,
                            "n_classes": 3, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 8}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 3}]},
        # 96 training rows in batches of 48: one batch shape, one graph to compile (a cold compile on 2 cores
        # takes about 20 s a graph)
        "training": {"epochs": 3, "batch_size": 48, "compile": compile},
        "resources": {"device": "cpu"},
    }


def losses_of(result) -> list[float]:
    return [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]


class DeviceReads(TorchDispatchMode):
    """Counts what reads a tensor's values back to the host: item(), float(), bool() (one op underneath
    them all), and tolist(), cpu() and numpy(), which on the CPU dispatch nothing and are counted by name."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in ("tolist", "cpu", "numpy"):
            method = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counting(method))

    def counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_in_a_run(tmp_path, monkeypatch, n_samples: int) -> int:
    spec = parse_spec({**small_spec(n_samples), "training": {"epochs": 2, "batch_size": 10}})
    trainer = prepare_run(spec, tmp_path / str(n_samples)).trainer
    with monkeypatch.context() as patches, DeviceReads(patches) as reads:
        trainer.fit()
    return reads.count


def test_the_batch_loop_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    # Four times the batches, the same reads: the results are read back once an epoch, not once a batch.
    assert reads_in_a_run(tmp_path, monkeypatch, 50) == reads_in_a_run(tmp_path, monkeypatch, 200)


class PreemptAt(Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_batch_end(self, state):
        if state.epoch + 1 == self.epoch and state.batch == self.batch:
            raise StopTraining("preempted", checkpoint=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run uncompiled, one compiled, and the compiled one preempted mid-epoch and resumed (its second
    attempt finds its graphs compiled in this process: the compile is paid once)."""
    tmp = tmp_path_factory.mktemp("compile")
    plain = train(parse_spec(small_spec()), tmp / "plain")
    compiled = train(parse_spec(small_spec(compile=True)), tmp / "compiled")
    spec = parse_spec(small_spec(compile=True))
    stopped = finish(prepare_run(spec, tmp / "resumed", callbacks=[PreemptAt(2, 1)]), spec, tmp / "resumed")
    assert stopped.status == "stopped"
    resumed = train(spec, tmp / "resumed", resume=True)
    return plain, compiled, resumed


def test_a_compiled_run_s_losses_equal_the_uncompiled_run_s(runs):
    plain, compiled, _ = runs
    assert compiled.status == "succeeded", compiled.error
    assert losses_of(compiled) == pytest.approx(losses_of(plain), abs=1e-5, rel=0)


def test_the_model_card_records_the_seconds_spent_compiling(runs):
    plain, compiled, _ = runs
    assert json.loads(plain.card_path.read_text())["compile_seconds"] is None
    card = json.loads(compiled.card_path.read_text())
    assert card["compile_seconds"] > 0 and card["compile_seconds"] == compiled.compile_seconds


def test_a_compiled_run_s_checkpoints_and_weights_hold_the_plain_module_s_keys(runs):
    plain, compiled, _ = runs
    checkpoint = torch.load(sorted((compiled.out_dir / "checkpoints").iterdir())[-1], weights_only=True)
    plain_checkpoint = torch.load(sorted((plain.out_dir / "checkpoints").iterdir())[-1], weights_only=True)
    assert list(checkpoint["model"]) == list(plain_checkpoint["model"]) == ["body.0.weight", "body.0.bias",
                                                                            "body.2.weight", "body.2.bias"]
    assert load_file(compiled.weights_path).keys() == load_file(plain.weights_path).keys()


def test_a_compiled_run_resumed_mid_epoch_ends_with_the_same_bytes(runs):
    _, compiled, resumed = runs
    assert resumed.status == "succeeded"
    assert resumed.weights_path.read_bytes() == compiled.weights_path.read_bytes()
    assert losses_of(resumed) == losses_of(compiled)


def test_training_compile_is_a_boolean_off_by_default():
    assert parse_spec(small_spec()).training.compile is False
    with pytest.raises(SpecError) as error:
        parse_spec({**small_spec(), "training": {"compile": "yes"}})
    assert [problem.path for problem in error.value.problems] == ["training.compile"]


def test_the_job_log_s_closing_line_says_how_long_compiling_took():
    result = TrainResult(status="succeeded", stop_reason="completed", epochs_completed=3, compile_seconds=4.31)
    assert closing_line("succeeded", result) == ("INFO", "succeeded after 3 epochs (completed); compiling took 4.3 s")
    assert closing_line("succeeded", TrainResult(status="succeeded", stop_reason="completed", epochs_completed=3)) \
        == ("INFO", "succeeded after 3 epochs (completed)")
