"""Loops: search, retrain, evaluate, predict. Callbacks are the only outward seam."""

from nas_core.engine.callbacks import Callback, CallbackList
from nas_core.engine.checkpoint import CheckpointError, load_checkpoint
from nas_core.engine.context import TrainingError
from nas_core.engine.search import SearchResult, run_search
from nas_core.engine.train import TrainResult, run_train

__all__ = ["Callback", "CallbackList", "CheckpointError", "load_checkpoint", "TrainingError",
           "SearchResult", "run_search", "TrainResult", "run_train"]
