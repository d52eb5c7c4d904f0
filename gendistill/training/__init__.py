"""Training on accelerate: the shared loop, EMA and checkpoints."""
from .ema import EMA
from .loop import TrainingError, latest_checkpoint, train

__all__ = ["EMA", "TrainingError", "latest_checkpoint", "train"]
