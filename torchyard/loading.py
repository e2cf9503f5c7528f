"""Rebuild a trained network from its output folder or downloaded bundle, without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from models.spec import JobSpec
from worker.engine import CARD, CARD_FORMAT, WEIGHTS, build_network, plan_network


def load_model(directory: str | Path, device: str = "cpu") -> nn.Module:
    """The trained nn.Module (in eval mode) from a folder holding model.json and weights.safetensors."""
    directory = Path(directory)
    card = json.loads((directory / CARD).read_text())
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{directory / CARD} is not a torchyard model card ({card.get('format')!r})")
    spec = JobSpec.model_validate(card["spec"])
    plan = plan_network(spec, tuple(card["input_shape"]), card["n_outputs"])
    shape = tuple(card["input_shape"])
    # Placeholders: the real standardization statistics come with the weights.
    mean, std = (torch.zeros(shape), torch.ones(shape)) if card["standardize"] else (None, None)
    model = build_network(spec, plan, mean, std)
    model.load_state_dict(safetensors.torch.load_file(directory / WEIGHTS, device="cpu"))
    return model.to(device).eval()
