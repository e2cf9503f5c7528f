"""The PyTorch training engine: spec -> network, data, trainer, callbacks, checkpoints.

It imports models.spec only from the service: no Flask, no Celery, no SQLAlchemy. This module is its
public face: code outside the engine imports from here, never from the modules behind it.
"""

from worker.engine.callbacks import PAUSED, Best, Callback, RunState, StopTraining, TrainingFailed
from worker.engine.checkpoints import position
from worker.engine.device import pick_device, thread_share
from worker.engine.memory import check_memory
from worker.engine.network import Network, build_network, plan_network
from worker.engine.outputs import CARD, CARD_FORMAT, WEIGHTS
from worker.engine.run import TrainResult, finish, prepare_run, train

__all__ = [
    "CARD", "CARD_FORMAT", "PAUSED", "WEIGHTS", "Best", "Callback", "Network", "RunState", "StopTraining",
    "TrainingFailed", "TrainResult", "build_network", "check_memory", "finish", "pick_device", "plan_network",
    "position", "prepare_run", "thread_share", "train",
]
