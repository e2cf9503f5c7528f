"""Mixed precision (training.precision): the forward pass under autocast, and float16's gradient scaler."""

from __future__ import annotations

from typing import Any

import torch

from models.spec import Problem, SpecError, precision_problem

_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Precision:
    """How a run computes: "32" does nothing; "bf16" and "16" autocast the forward pass; "16" scales the loss
    so small float16 gradients don't flush to zero (torch.amp.GradScaler), and skips a step whose gradient
    overflowed. Outputs come back in float32, so the loss and the metrics are always computed in float32."""

    def __init__(self, precision: str, device: torch.device):
        # The spec refused a fixed device that can't; this is "auto"'s check, once the device is known.
        problem = precision_problem(precision, device.type)
        if problem:
            raise SpecError([Problem("training.precision", problem)])
        self.device_type = device.type
        self.dtype = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16" else None

    def forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` under autocast, as float32."""
        if self.dtype is None:
            return model(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = model(x)
        return out.float()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradients true ones (for clipping) before the step; once a step at most."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's scale and growth tracker (float16), for an exact resume."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
