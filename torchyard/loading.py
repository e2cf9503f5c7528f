"""Rebuild a trained network from its output folder or downloaded bundle, without pickle, and predict with it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

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
        """X as a float32 batch of the network's input shape; a ValueError says what doesn't fit.

        A sample may come flat (``n_features`` values), in the input shape, or, for a one-channel image,
        without its channel (``(N, 8, 8)`` for ``[1, 8, 8]``): each reshapes one way only."""
        needs = f"X must be rows of {self.n_features} number{'s' if self.n_features != 1 else ''}"
        try:
            array = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{needs}: {exc}") from None
        if array.ndim == 0:
            raise ValueError(f"{needs} (a list of rows or a 2-D array); got {type(X).__name__}")
        shapes = [self.input_shape, (self.n_features,)]
        if len(self.input_shape) > 1 and self.input_shape[0] == 1:
            shapes.append(self.input_shape[1:])  # one channel, left out
        if array.shape in shapes or array.ndim == 1:
            array = array.reshape(1, *array.shape)  # one sample
        if array.shape[0] == 0:
            raise ValueError("X holds no rows")
        if array.shape[1:] not in shapes:
            s = "" if self.n_features == 1 else "s"
            shaped = f" (reshaped to {list(self.input_shape)})" if len(self.input_shape) > 1 else ""
            width = array.shape[1] if array.ndim == 2 else list(array.shape[1:])
            raise ValueError(f"each row needs {self.n_features} feature{s}{shaped}, as the model was trained on; "
                             f"got rows of {width}")
        array = array.reshape(len(array), *self.input_shape)
        bad = np.argwhere(~np.isfinite(array.reshape(len(array), -1)))
        if len(bad):
            row, column = bad[0]
            value = array.reshape(len(array), -1)[row, column]
            raise ValueError(f"X row {row}, column {column} is {value}: predict needs finite numbers")
        return array


def _classes(card: dict) -> list:
    """What each class index stands for; a card written before classes were recorded had labels 0..k-1."""
    if card.get("classes") is not None:
        return card["classes"]
    return [0, 1] if card["task"] == "binary" else list(range(card["n_outputs"]))


class ModelError(ValueError):
    """A model folder or bundle that can't be loaded, naming the file and what is wrong with it."""


# What a safetensors file may hold beyond the tensors' bytes: its 8-byte length and JSON header (a name,
# dtype, shape and offsets a tensor; padding), far more than the engine writes, far short of a flood.
HEADER_ALLOWANCE = 64 * 1024
HEADER_PER_TENSOR = 1024
# safetensors' dtype names for the torch dtypes a state dict holds.
_DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def load_model(path: str | Path, device: str = "cpu") -> TrainedModel:
    """The trained model (in eval mode) from a folder holding model.json and weights.safetensors, or from
    a bundle's .tar.gz itself (read in memory, by torchyard.bundle's allow-list). A file that is missing
    is a FileNotFoundError; a card, weights or bundle that isn't a torchyard model's is a ModelError or a
    BundleError (both ValueErrors) naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        card_name, weights_name = path / CARD, path / WEIGHTS
        card, expected = _read_card(card_name.read_bytes(), card_name)
        size, limit = weights_name.stat().st_size, _weights_limit(expected)
        if size > limit:
            raise ModelError(f"{weights_name}: {size} bytes, more than the {limit} the network of {CARD} needs")
        weights = weights_name.read_bytes()
    elif path.is_file():
        card_name, cards = f"{path}: {CARD}", []

        def limit(card_text: bytes) -> int:
            cards[:] = cards or [_read_card(card_text, card_name)]  # asked once or twice, read once
            return _weights_limit(cards[0][1])

        files = read_bundle(path, weights_limit=limit)
        card, expected = cards[0]
        weights, weights_name = files[WEIGHTS], f"{path}: {WEIGHTS}"
    else:
        raise FileNotFoundError(f"no model folder or bundle at {path}")
    tensors = _read_weights(weights, expected, weights_name)
    shape = tuple(card["input_shape"])
    # Placeholders: the real standardization statistics come with the weights.
    mean, std = (torch.zeros(shape), torch.ones(shape)) if card["standardize"] else (None, None)
    network = build_network(JobSpec.model_validate(card["spec"]), _plan(card, card_name), mean, std)
    model = TrainedModel(card, network.body, mean, std)
    model.load_state_dict(tensors)
    return model.to(device).eval()


def _read_card(text: bytes, name) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """The model card and what its network's state holds (each tensor's dtype and shape), by planning the
    network on the meta device: no memory spent, however large a card claims the network is."""
    try:
        card = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (a UnicodeDecodeError is a ValueError)
        raise ModelError(f"{name}: not JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelError(f"{name}: not a torchyard model card (its format is not {CARD_FORMAT!r})")
    try:
        spec = JobSpec.model_validate(card["spec"])
        shape = tuple(card["input_shape"])
        with torch.device("meta"):  # even the placeholders: a card may claim any input shape
            mean, std = (torch.zeros(shape), torch.ones(shape)) if card["standardize"] else (None, None)
            network = build_network(spec, _plan(card, name), mean, std)
        TrainedModel(card, network.body)  # the card's other fields, checked once here
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{name}: not a usable model card: {type(exc).__name__}: {exc}") from None
    state = {key: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for key, t in network.state_dict().items()}
    return card, state


def _plan(card: dict, name):
    try:
        return plan_network(JobSpec.model_validate(card["spec"]), tuple(card["input_shape"]), card["n_outputs"])
    except ValueError as exc:
        raise ModelError(f"{name}: its network can't be built: {exc}") from None


def _weights_limit(expected: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """The most bytes a weights file of this network may be: its tensors' bytes and a header."""
    tensors = sum(math.prod(shape) * _itemsize(dtype) for dtype, shape in expected.values())
    return tensors + 8 + HEADER_ALLOWANCE + HEADER_PER_TENSOR * len(expected)


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)


def _read_weights(data: bytes, expected: dict, name) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, once its header (an 8-byte little-endian length, then JSON naming
    each tensor's dtype, shape and byte offsets) says it holds exactly the tensors the card's network has."""
    if len(data) < 8:
        raise ModelError(f"{name}: not a safetensors file ({len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ModelError(f"{name}: not a safetensors file (its header claims {length} bytes; the file has "
                         f"{len(data) - 8} after the length)")
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{name}: not a safetensors file (its header isn't JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name}: not a safetensors file (its header isn't a JSON object)")
    header.pop("__metadata__", None)
    found = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise ModelError(f"{name}: not a safetensors file (tensor {key!r} has no shape)")
        found[key] = (entry.get("dtype"), tuple(entry["shape"]))
    if found != expected:
        raise ModelError(f"{name} doesn't match the network of {CARD}: {_difference(expected, found)}")
    try:
        return safetensors.torch.load(data)
    except SafetensorError as exc:
        raise ModelError(f"{name}: not a readable safetensors file: {exc}") from None


def _difference(expected: dict, found: dict) -> str:
    """The first way the weights' tensors differ from the network's, in words."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        return f"no tensor {missing[0]!r}" + (f" ({len(missing)} missing)" if len(missing) > 1 else "")
    if extra:
        return f"an unexpected tensor {extra[0]!r}"
    key = next(k for k in expected if expected[k] != found[k])
    (dtype, shape), (got_dtype, got_shape) = expected[key], found[key]
    return f"{key!r} is {got_dtype} {list(got_shape)}; the card's network has {dtype} {list(shape)}"
