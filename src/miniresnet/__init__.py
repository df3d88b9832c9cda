"""miniresnet: train, evaluate and use a small residual network on CIFAR-10."""

__version__ = "0.1.0"

from .checkpoint import load_model
from .config import PRESETS, TrainConfig
from .errors import MiniResNetError
from .model import MiniResNet

__all__ = ["CLASSES", "PRESETS", "MiniResNet", "MiniResNetError", "TrainConfig", "load_model"]


def __getattr__(name: str):
    # CLASSES lives with the data readers (numpy, tqdm); importing it lazily keeps `import miniresnet`,
    # and so torch.hub, to torch alone.
    if name == "CLASSES":
        from .data import CLASSES

        return CLASSES
    raise AttributeError(f"module 'miniresnet' has no attribute {name!r}")
