"""Rebuild a trained network from its output folder or downloaded bundle, without pickle, and predict with it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from models.spec import JobSpec
from torchyard.bundle import CARD, WEIGHTS, read_bundle
from worker.engine import CARD_FORMAT, Network, build_network, plan_network


class TrainedModel(Network):
    """The trained network (an ``nn.Module``: call it on tensors as in training) with what its model card
    says about its inputs and outputs, so it can take rows of raw features and give labels.

    ``predict(X)`` gives labels as they were in the data (text labels, integer classes, or floats for
    regression); ``predict_proba(X)`` gives classifiers' class probabilities, one row a sample, one column a
    class in ``classes`` order. Both take a NumPy array or a list of rows of features, or a single row; rows
    are reshaped to the card's ``image_shape`` and standardized as in training (the network holds the
    statistics fitted on the training data), under ``torch.inference_mode`` in eval mode.
    """

    def __init__(self, card: dict[str, Any], body, mean=None, std=None):
        super().__init__(body, mean, std)
        self.card = card
        self.spec = JobSpec.model_validate(card["spec"])
        self.task: str = card["task"]
        self.input_shape: tuple[int, ...] = tuple(card["input_shape"])
        self.n_features = math.prod(self.input_shape)
        self.feature_names: list[str] | None = card.get("features")
        self.classes: list | None = _classes(card) if self.task != "regression" else None

    def predict(self, X) -> np.ndarray:
        """Labels as in the data for each row (regression: floats, one column a target, or flat for one)."""
        outputs = self._outputs(X)
        if self.task == "regression":
            values = outputs.double().numpy()
            return values[:, 0] if values.shape[1] == 1 else values
        if self.task == "binary":
            threshold = 0.5 if self.spec.loss_type == "BCELoss" else 0.0  # probabilities or logits, as trained
            indices = (outputs[:, 0] > threshold).long().numpy()
        else:
            indices = outputs.argmax(dim=1).numpy()
        return np.asarray(self.classes)[indices]

    def predict_proba(self, X) -> np.ndarray:
        """Each row's class probabilities (rows sum to 1; binary: two columns, [1 - p, p])."""
        if self.task == "regression":
            raise ValueError("predict_proba is for classifiers; this model's task is regression: use predict")
        outputs = self._outputs(X)
        if self.task == "binary":
            p = outputs[:, 0] if self.spec.loss_type == "BCELoss" else torch.sigmoid(outputs[:, 0])
            return torch.stack([1 - p, p], dim=1).double().numpy()
        # Softmax of logits (CrossEntropyLoss) and of log-probabilities (NLLLoss) alike.
        return torch.softmax(outputs.double(), dim=1).numpy()

    def _outputs(self, X) -> torch.Tensor:
        """The network's outputs for the rows of X, on the CPU."""
        batch = torch.as_tensor(self.as_batch(X))
        device = next((t.device for t in [*self.parameters(), *self.buffers()]), torch.device("cpu"))
        training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self(batch.to(device)).cpu()
        finally:
            self.train(training)

    def as_batch(self, X) -> np.ndarray:
        """X as a float32 batch of the network's input shape; a ValueError says what doesn't fit."""
        try:
            array = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"X must be rows of {self.n_features} numbers: {exc}") from None
        if array.shape == self.input_shape or array.ndim == 1:
            array = array.reshape(1, *array.shape)  # one sample
        if array.shape[1:] == self.input_shape:
            return array
        shaped = f" (reshaped to {list(self.input_shape)})" if len(self.input_shape) > 1 else ""
        if array.ndim == 2 and array.shape[0] == 0:
            raise ValueError("X holds no rows")
        if array.ndim == 2 and array.shape[1] == self.n_features:
            return array.reshape(len(array), *self.input_shape)
        width = array.shape[1] if array.ndim == 2 else list(array.shape[1:])
        raise ValueError(f"each row needs {self.n_features} features{shaped}, as the model was trained on; "
                         f"got rows of {width}")


def _classes(card: dict) -> list:
    """What each class index stands for; a card written before classes were recorded had labels 0..k-1."""
    if card.get("classes") is not None:
        return card["classes"]
    return [0, 1] if card["task"] == "binary" else list(range(card["n_outputs"]))


def load_model(path: str | Path, device: str = "cpu") -> TrainedModel:
    """The trained model (in eval mode) from a folder holding model.json and weights.safetensors, or from
    a bundle's .tar.gz itself (read in memory, by torchyard.bundle's allow-list)."""
    path = Path(path)
    if path.is_dir():
        card_text = (path / CARD).read_bytes()
        tensors = safetensors.torch.load_file(path / WEIGHTS, device="cpu")
    elif path.is_file():
        files = read_bundle(path)
        card_text, tensors = files[CARD], safetensors.torch.load(files[WEIGHTS])
    else:
        raise FileNotFoundError(f"no model folder or bundle at {path}")
    card = json.loads(card_text)
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path}: not a torchyard model card ({CARD})")
    spec = JobSpec.model_validate(card["spec"])
    shape = tuple(card["input_shape"])
    plan = plan_network(spec, shape, card["n_outputs"])
    # Placeholders: the real standardization statistics come with the weights.
    mean, std = (torch.zeros(shape), torch.ones(shape)) if card["standardize"] else (None, None)
    network = build_network(spec, plan, mean, std)
    model = TrainedModel(card, network.body, mean, std)
    model.load_state_dict(tensors)
    return model.to(device).eval()
