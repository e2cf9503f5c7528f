"""Engine speed against hand-written PyTorch loops and Lightning, on the same data, seed and thread count.

    python bench/engine.py [--epochs 3] [--repeats 3]

For each workload it times the training loop only (data already in memory, model built):
  engine      torchyard's Trainer.fit() (metrics, callbacks, checkpoint at the end included)
  compiled    the engine with training.compile: its loop time without the compile, which is printed apart
  naive       the loop a tutorial writes: randperm, then each batch indexed by its slice of it, and
              torch.optim.Adam(lr) with torch's defaults (on the CPU, the for-loop kernels): the baseline
  same        hand-written, same kernels: one gather an epoch, then slices, Adam with the engine's kernels
  dataloader  DataLoader(TensorDataset(X, y), shuffle=True), Adam with the engine's kernels
  lightning   a LightningModule and lightning.Trainer (logger, checkpoints, progress bar and model summary
              off) over the same DataLoader, Adam with the engine's kernels; left out when lightning is not
              installed (it is no dependency of torchyard: pip install lightning)
and prints medians and the ratios engine/naive (goal <= 0.8), engine/same, engine/dataloader,
engine/lightning and compiled/naive. Runs are interleaved, their order rotated each repeat.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
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


COMPILE_SECONDS: list[float] = []  # each compiled run's compile time, printed apart from its loop time


def compiled_seconds(spec, out_dir: Path) -> float:
    """The engine with training.compile: the loop's time less the steps that compiled (one step each of
    its work is left out with them, a millisecond against the seconds they take)."""
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"compile": True})})
    prepared = prepare_run(spec, out_dir)
    started = time.perf_counter()
    prepared.trainer.fit()
    seconds = time.perf_counter() - started
    COMPILE_SECONDS.append(prepared.trainer.compile_seconds)
    return seconds - prepared.trainer.compile_seconds


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


def naive_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    """The tutorial's loop: torch's default Adam, and each batch gathered by its slice of a permutation."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _epoch in range(epochs):
        permutation = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            indices = permutation[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[indices]), y[indices])
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def hand_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    """Hand-written with the engine's kernels: one gather an epoch, then every batch a slice of it."""
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


def loader(x, y, batch_size, seed) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def dataloader_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    optimizer = adam(model)
    batches = loader(x, y, batch_size, seed)
    started = time.perf_counter()
    for _epoch in range(epochs):
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def lightning_seconds(model, loss_fn, x, y, epochs, batch_size, seed) -> float:
    """lightning.Trainer.fit() of a LightningModule over the DataLoader, with everything optional off."""
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.loss_fn = model, loss_fn

        def training_step(self, batch, batch_index):
            xb, yb = batch
            return self.loss_fn(self.model(xb), yb)

        def configure_optimizers(self):
            return adam(self.model)

    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    batches = loader(x, y, batch_size, seed)
    started = time.perf_counter()
    trainer.fit(Module(), train_dataloaders=batches)
    return time.perf_counter() - started


def has_lightning() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # its "GPU available: False" lines
    warnings.filterwarnings("ignore", module="lightning")  # e.g. "consider more num_workers"
    return True


ENGINES = {"engine": engine_seconds, "compiled": compiled_seconds}
LOOPS = {"naive": naive_seconds, "same": hand_seconds, "dataloader": dataloader_seconds,
         "lightning": lightning_seconds}


def bench(name: str, raw: dict, epochs: int, repeats: int, kinds: list[str]) -> dict:
    spec = parse_spec({**raw, "name": name, "training": {**raw["training"], "epochs": epochs},
                       "checkpoint": {"every_n_epochs": epochs, "keep_last": 1}})
    times = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_run(spec, Path(tmp) / "setup")
        data, loss_fn = prepared.data, prepared.trainer.loss_fn
        for repeat in range(repeats):  # interleaved, order rotated, so drifting load hits all alike
            turn = repeat % len(kinds)
            for kind in kinds[turn:] + kinds[:turn]:
                if kind in ENGINES:
                    times[kind].append(ENGINES[kind](spec, Path(tmp) / f"{kind}{repeat}"))
                else:
                    times[kind].append(LOOPS[kind](fresh_copy(prepared, spec.seed), loss_fn, data.x_train,
                                                   data.y_train, epochs, spec.training.batch_size, spec.seed))
    return {kind: statistics.median(values) for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kinds = ["engine", "compiled", "naive", "same", "dataloader", "lightning"]
    if not has_lightning():
        print("lightning: not installed (pip install lightning)")
        kinds.remove("lightning")
    kernels = components.implementation(adam(nn.Linear(1, 1)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs, "
          f"median of {args.repeats}; the engine's Adam kernels: {kernels}, naive's: "
          f"{components.implementation(torch.optim.Adam(nn.Linear(1, 1).parameters()))}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    ratios = [("engine", "naive"), ("engine", "same"), ("engine", "dataloader"), ("engine", "lightning"),
              ("compiled", "naive")]
    ratios = [(a, b) for a, b in ratios if b in kinds]
    print(f"{'workload':<10}" + "".join(f"{kind + ' s':>13}" for kind in kinds)
          + "".join(f"{a + '/' + b:>18}" for a, b in ratios))
    for name, raw in WORKLOADS.items():
        COMPILE_SECONDS.clear()
        t = bench(name, raw, args.epochs, args.repeats, kinds)
        print(f"{name:<10}" + "".join(f"{t[kind]:>13.3f}" for kind in kinds)
              + "".join(f"{t[a] / t[b]:>18.3f}" for a, b in ratios))
        print(f"{'':<10}compiled: its loop time above leaves out compiling, which took "
              f"{', '.join(f'{s:.1f}' for s in COMPILE_SECONDS)} s (each run compiles anew; the first may fill "
              "inductor's on-disk cache)")
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
