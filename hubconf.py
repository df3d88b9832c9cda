"""torch.hub entry point: `torch.hub.load("<owner>/miniresnet", "mini_resnet", pretrained=True, weights="best")`,
or `torch.hub.load("path/to/clone", "mini_resnet", source="local", ...)` offline. Needs torch only."""

import sys
from pathlib import Path

dependencies = ["torch"]


def mini_resnet(pretrained: bool = False, weights: str | None = None, **kwargs):
    """The Mini-ResNet. pretrained=True: the shipped model named `weights` (default: "best"; `miniresnet
    models` lists them), in eval mode, with .classes, .mean and .std (the same module
    `miniresnet.load_model(weights)` returns); otherwise an untrained MiniResNet(**kwargs) (widths,
    blocks_per_stage, num_classes). A shipped model is read from this clone's package, never from a
    file of that name in the working directory."""
    src = str(Path(__file__).resolve().parent / "src")  # this clone's package, not another installed one
    if src not in sys.path:
        sys.path.insert(0, src)
    from miniresnet import MiniResNet, load_model
    from miniresnet.pretrained import DEFAULT_MODEL, shipped_weights

    if pretrained and kwargs:
        raise ValueError(f"pretrained=True loads a shipped model as it is: {sorted(kwargs)} cannot change it")
    if not pretrained and weights is not None:
        raise ValueError(f"weights={weights!r} names a shipped model: pass pretrained=True to load it")
    return load_model(shipped_weights(weights or DEFAULT_MODEL)) if pretrained else MiniResNet(**kwargs)
