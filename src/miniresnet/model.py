"""The Mini-ResNet of the seed spec: a 3x3 stem, three stages of residual blocks joined by
stride-2 convolutions, global average pooling and one linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU: the stem and the stride-2 transitions between stages."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (the original ResNet 'basic block')."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place where autograd allows it (BatchNorm's backward does not need its output), so
        # the step writes two fewer activation-sized tensors per block.
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu_(out.add_(x))


class MiniResNet(nn.Module):
    """Widths and blocks per stage are parameters; the defaults are the seed spec's (~0.22M weights).
    `zero_init_residual` changes only the initial weights, not the architecture.

    Convolutions carry no bias because the BatchNorm after each one has its own shift.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 2,
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.blocks_per_stage = blocks_per_stage
        layers: list[nn.Module] = [conv_bn_relu(3, widths[0])]
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(conv_bn_relu(widths[i - 1], width, stride=2))
            layers.extend(ResidualBlock(width) for _ in range(blocks_per_stage))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)
        if zero_init_residual:  # each block starts as the identity: a shallower net to begin with
            for block in self.modules():
                if isinstance(block, ResidualBlock):
                    nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(x.mean(dim=(2, 3)))

    def arch(self) -> dict:
        """What a checkpoint needs to rebuild this model."""
        return {
            "widths": list(self.widths),
            "blocks_per_stage": self.blocks_per_stage,
            "num_classes": self.fc.out_features,
        }


def whiten_stem(model: MiniResNet, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Start the stem convolution from the data: its filters become the principal directions of
    the kxk patches of `images` (normalised, N x C x H x W), largest variance first, each scaled so
    its output has unit variance, followed by their negatives (after BatchNorm and ReLU, each
    direction then passes both its positive and its negative part). Filters beyond twice the patch
    dimension keep their initialisation. Computed in float64, so every CPU gets the same filters."""
    conv = model.features[0][0]
    c_out, c_in, kh, kw = conv.weight.shape
    dims = c_in * kh * kw
    second_moment = torch.zeros(dims, dims, dtype=torch.float64)
    total = torch.zeros(dims, dtype=torch.float64)
    count = 0
    for chunk in images.split(256):
        patches = F.unfold(chunk.double(), (kh, kw)).transpose(1, 2).reshape(-1, dims)  # patches inside the image
        second_moment += patches.T @ patches
        total += patches.sum(0)
        count += len(patches)
    mean = total / count
    covariance = second_moment / count - torch.outer(mean, mean)
    variances, directions = torch.linalg.eigh(covariance)  # ascending
    k = min(c_out // 2, dims)
    top = directions[:, -k:].flip(1).T / (variances[-k:].flip(0) + eps).sqrt()[:, None]
    with torch.no_grad():
        conv.weight[: 2 * k] = torch.cat([top, -top]).view(2 * k, c_in, kh, kw).to(conv.weight.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass for one image, counted over convolutions and
    linear layers (BatchNorm, ReLU, adds and pooling are a rounding error next to them)."""
    total = 0

    def on_conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += output[0].numel() * per_output

    def on_linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(on_linear))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
