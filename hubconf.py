"""torch.hub entry point: `torch.hub.load("<owner>/miniresnet", "mini_resnet", pretrained=True, weights="best")`,
or `torch.hub.load("path/to/clone", "mini_resnet", source="local", ...)` offline. Needs torch only."""

import sys
from pathlib import Path

dependencies = ["torch"]


def mini_resnet(pretrained: bool = False, weights: str | None = None, **kwargs):
    """The Mini-ResNet. pretrained=True: the shipped model named `weights` (default: "best"; `miniresnet
    models` lists them), in eval mode, with .classes, .mean and .std (the same module
    `miniresnet.load_model(weights)` returns); otherwise an untrained MiniResNet(**kwargs) (widths,
    blocks_per_stage, num_classes)."""
    src = str(Path(__file__).resolve().parent / "src")  # this clone's package, not another installed one
    if src not in sys.path:
        sys.path.insert(0, src)
    from miniresnet import MiniResNet, load_model
    from miniresnet.pretrained import DEFAULT_MODEL

    return load_model(weights or DEFAULT_MODEL) if pretrained else MiniResNet(**kwargs)
