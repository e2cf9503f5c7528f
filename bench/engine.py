"""Engine speed against two hand-written PyTorch loops, on the same data, seed and thread count.

    python bench/engine.py [--epochs 3] [--repeats 3]

For each workload it times the training loop only (data already in memory, model built):
  engine      torchyard's Trainer.fit() (metrics, callbacks, checkpoint at the end included)
  hand        randperm + slicing over tensors: the fastest plain loop, the limit
  dataloader  the tutorial loop: DataLoader(TensorDataset(X, y), shuffle=True)
  for-loop    the engine again, with torch's for-loop optimizer kernels instead of the ones it picks
and prints medians and the ratios engine/hand (goal <= 1.05), engine/dataloader (goal <= 0.8) and
engine/for-loop (what the engine's choice of kernels saves). The plain loops use the engine's kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.validation import parse_spec  # noqa: E402
from worker.engine import components, prepare_run  # noqa: E402

WORKLOADS = {
    "mlp": {
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression", "validation_split": 0,
                 "params": {"n_samples": 20_000, "n_features": 20, "noise": 5.0, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 64}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 64}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "Adam", "lr": 0.001},
        "training": {"batch_size": 64},
    },
    "cnn": {  # digits-sized images: 1x8x8, as in examples/digits-cnn.json
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0, "image_shape": [1, 8, 8],
                 "params": {"n_samples": 20_000, "n_features": 64, "n_informative": 20, "n_classes": 10,
                            "random_state": 0}},
        "model": {"layers": [{"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
                             {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
                             {"type": "Flatten"}, {"type": "Linear", "out_features": 10}]},
        "optimizer": {"type": "Adam", "lr": 0.001},
        "training": {"batch_size": 64},
    },
}


def engine_seconds(spec, out_dir: Path) -> float:
    prepared = prepare_run(spec, out_dir)
    started = time.perf_counter()
    prepared.trainer.fit()
    return time.perf_counter() - started


@contextlib.contextmanager
def for_loop_kernels():
    """The engine builds its optimizers with torch's for-loop kernels while this is open."""
    chosen = components.optimizer_kernels
    components.optimizer_kernels = lambda optimizer_type, device: {"foreach": False}
    try:
        yield
    finally:
        components.optimizer_kernels = chosen


def for_loop_engine_seconds(spec, out_dir: Path) -> float:
    with for_loop_kernels():
        return engine_seconds(spec, out_dir)


def adam(model) -> torch.optim.Adam:
    """The workloads' optimizer with the kernels the engine picks for it on the CPU."""
    return torch.optim.Adam(model.parameters(), lr=0.001, **components.optimizer_kernels("Adam", torch.device("cpu")))


def fresh_copy(prepared, seed: int):
    """The same network, freshly initialized with the same seed, for a plain loop."""
    torch.manual_seed(seed)
    model = type(prepared.trainer.model.body)(*[type(m)(**_init_args(m)) for m in prepared.trainer.model.body])
    return model


def _init_args(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.Conv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": module.kernel_size, "padding": module.padding}
    if isinstance(module, nn.MaxPool2d):
        return {"kernel_size": module.kernel_size}
    return {}


def hand_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    optimizer = adam(model)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        xs, ys = x[order], y[order]
        for start in range(0, len(x), batch_size):
            loss = loss_fn(model(xs[start:start + batch_size]), ys[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def dataloader_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    optimizer = adam(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    started = time.perf_counter()
    for _epoch in range(epochs):
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def bench(name: str, raw: dict, epochs: int, repeats: int) -> dict:
    spec = parse_spec({**raw, "name": name, "training": {**raw["training"], "epochs": epochs},
                       "checkpoint": {"every_n_epochs": epochs, "keep_last": 1}})
    times = {"engine": [], "hand": [], "dataloader": [], "for-loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_run(spec, Path(tmp) / "setup")
        data, loss_fn = prepared.data, prepared.trainer.loss_fn
        for repeat in range(repeats):  # interleaved, order rotated, so drifting load hits all four alike
            runs = [("engine", engine_seconds), ("hand", hand_seconds), ("dataloader", dataloader_seconds),
                    ("for-loop", for_loop_engine_seconds)]
            for kind, loop in runs[repeat % 4:] + runs[:repeat % 4]:
                if kind in ("engine", "for-loop"):
                    times[kind].append(loop(spec, Path(tmp) / f"{kind}{repeat}"))
                else:
                    times[kind].append(loop(fresh_copy(prepared, spec.seed), loss_fn, data.x_train,
                                            data.y_train, epochs, spec.training.batch_size, spec.seed))
    return {kind: statistics.median(values) for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kernels = components.implementation(adam(nn.Linear(1, 1)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs, "
          f"median of {args.repeats}; Adam's kernels: {kernels} (for-loop: torch's for-loop kernels)")
    print(f"{'workload':<10}{'engine s':>10}{'hand s':>10}{'loader s':>10}{'for-loop s':>12}"
          f"{'engine/hand':>13}{'engine/loader':>15}{'engine/for-loop':>17}")
    for name, raw in WORKLOADS.items():
        t = bench(name, raw, args.epochs, args.repeats)
        print(f"{name:<10}{t['engine']:>10.3f}{t['hand']:>10.3f}{t['dataloader']:>10.3f}{t['for-loop']:>12.3f}"
              f"{t['engine'] / t['hand']:>13.3f}{t['engine'] / t['dataloader']:>15.3f}"
              f"{t['engine'] / t['for-loop']:>17.3f}")


if __name__ == "__main__":
    main()
