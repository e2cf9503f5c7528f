"""torchyard: training-as-a-service for PyTorch. ``load_model`` rebuilds a trained network."""

__all__ = ["load_model"]


def __getattr__(name):
    # Imported lazily so ``import torchyard`` (the CLI, the client) doesn't pay for torch.
    if name == "load_model":
        from torchyard.loading import load_model

        return load_model
    raise AttributeError(name)
