"""Accuracy, per-class accuracy and the confusion matrix of a model on a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import CLASSES
from .loader import BatchLoader
from .runtime import autocast

TTA_MODES = ("none", "flip", "flip-translate")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    batch_size: int = 1000,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    tta: str = "none",
) -> dict:
    """Every image once, in order; returns plain numbers (JSON-ready). With `tta`, each image's
    logits are the mean over its augmented views (see `views`)."""
    loader = BatchLoader(images, labels, batch_size, mean, std, device=device, channels_last=channels_last)
    was_training = model.training
    model.eval()
    num_classes = len(CLASSES)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = 0.0
    for x, y in loader:
        with autocast(device, dtype):
            logits = torch.stack([model(v).float() for v in views(x, tta)]).mean(0)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted = logits.argmax(1)
        pairs = (y * num_classes + predicted).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    n = int(confusion.sum())
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "accuracy": confusion.diag().sum().item() / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class": {c: round(v, 6) for c, v in zip(CLASSES, per_class, strict=True)},
        "confusion": confusion.tolist(),
    }


def views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views test-time augmentation averages over. `flip`: the image and its mirror (training
    flipped at random, so both are equally familiar). `flip-translate`: also each of them shifted
    by 2 pixels up-left and down-right, with reflected borders (training cropped at up to 4)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if tta == "none":
        return [x]
    out = [x, x.flip(3)]
    if tta == "flip-translate":
        size = x.shape[-1]
        for v in out[:2]:
            padded = F.pad(v, (2, 2, 2, 2), mode="reflect")
            out += [padded[..., :size, :size], padded[..., 4:, 4:]]
    return out
