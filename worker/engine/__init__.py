"""The PyTorch training engine: spec -> network, data, trainer, callbacks, checkpoints.

It imports models.spec only from the service: no Flask, no Celery, no SQLAlchemy.
"""

from worker.engine.callbacks import Callback, RunState, StopTraining, TrainingFailed
from worker.engine.run import TrainResult, prepare_run, train

__all__ = ["Callback", "RunState", "StopTraining", "TrainingFailed", "TrainResult", "prepare_run", "train"]
