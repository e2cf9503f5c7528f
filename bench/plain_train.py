"""The run bench/train_process.py times `torchyard train` on, written by hand as a plain PyTorch script.

    python bench/plain_train.py OUT_DIR EPOCHS

The same data (scikit-learn's make_regression, float32), network, seed, optimizer kernels (Adam, fused on
the CPU as the engine picks), batches (randperm, one gather an epoch, slices) and epochs; a line an epoch;
the final weights written with safetensors.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import make_regression
from torch import nn


def main(out_dir: Path, epochs: int) -> None:
    X, y = make_regression(n_samples=20_000, n_features=20, noise=5.0, random_state=0)
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).reshape(-1, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, fused=True)
    loss_fn = nn.MSELoss()
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        xs, ys = x[order], y[order]
        total = torch.zeros(())
        for start in range(0, len(x), 64):
            xb, yb = xs[start:start + 64], ys[start:start + 64]
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(xb)
        print(f"epoch {epoch + 1}/{epochs}  loss {total.item() / len(x):.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(out_dir / "weights.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
