"""A batch's forward pass and loss, as one function: plain, or torch.compile'd (training.compile).

Compiled, the forward pass and the loss are one graph (inductor, the default backend), and AOTAutograd
compiles its backward with it. Shapes are static (``dynamic=False``): a run has at most a few batch shapes
(the full batch, a shorter last one, a rank's shard), and each gets its own graph, compiled at its first step.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.callbacks import TrainingFailed
from worker.engine.precision import Precision


class ForwardLoss:
    """``(outputs, loss)`` of a batch: the model under the run's precision, then the loss."""

    def __init__(self, model: nn.Module, precision: Precision, loss_fn: nn.Module, compile: bool = False):
        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = precision.forward(model, x)
            return out, loss_fn(out, y)

        self.compiled = compile
        self.shapes: set[tuple[int, ...]] = set()
        if compile:
            # Compiled code is cached per Python function, up to a limit of versions (one per network and batch
            # shape): a worker process runs job after job through this same function, so each run starts afresh.
            torch._dynamo.reset()
            forward_loss = torch.compile(forward_loss, dynamic=False)
        self.forward_loss = forward_loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.forward_loss(x, y)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler on this machine
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TrainingFailed(f"training.compile: torch.compile failed on this worker: {first_line}") from None

    def compiles(self, x: torch.Tensor) -> bool:
        """Whether the step of batch ``x`` compiles (its shape is new to a compiled run): the trainer times it."""
        if not self.compiled:
            return False
        shape = tuple(x.shape)
        if shape in self.shapes:
            return False
        self.shapes.add(shape)
        return True
