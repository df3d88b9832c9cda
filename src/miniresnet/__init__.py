"""miniresnet: train, evaluate and use a small residual network on CIFAR-10."""

__version__ = "0.1.0"

from .checkpoint import load_model
from .config import PRESETS, TrainConfig
from .data import CLASSES
from .errors import MiniResNetError
from .model import MiniResNet

__all__ = ["CLASSES", "PRESETS", "MiniResNet", "MiniResNetError", "TrainConfig", "load_model"]
