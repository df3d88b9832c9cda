"""Accuracy, per-class accuracy and the confusion matrix of a model on a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .calibration import calibration_error
from .config import TTA_MODES
from .data import CLASSES
from .runtime import FP32, Precision, autocast


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    batch_size: int = 100,
    device: torch.device = torch.device("cpu"),
    precision: Precision = FP32,
    channels_last: bool = True,
    tta: str = "none",
) -> torch.Tensor:
    """float32 logits (N, classes) on the CPU for uint8 images, in order, in eval mode. With `tta`,
    each image's logits are the mean over its augmented views (see `views`)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    weights_dtype = next(model.parameters()).dtype  # float32, or float64 for numerical checks
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std, weights_dtype)
        x = x.contiguous(memory_format=memory_format)
        with autocast(device, precision):
            out.append(torch.stack([model(v).float() for v in views(x, tta)]).mean(0))
    model.train(was_training)
    return torch.cat(out).cpu()  # one copy back at the end: a GPU does not wait after every batch


def classify(model: nn.Module, images: torch.Tensor, top_k: int = 3, **options) -> list[list[tuple[str, float]]]:
    """For each uint8 image (N, 3, 32, 32), its `top_k` classes with their probabilities, most
    likely first, for a model from `load_model` (it carries classes, mean, std and the temperature
    that calibrates its probabilities); options as for `predict_logits`."""
    logits = predict_logits(model, images, model.mean, model.std, **options)
    probabilities = (logits / getattr(model, "temperature", 1.0)).softmax(1)
    top = probabilities.topk(min(top_k, len(model.classes)))
    return [
        [(model.classes[i], round(p, 6)) for p, i in zip(ps, ids, strict=True)]
        for ps, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def metrics(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], temperature: float = 1.0) -> dict:
    """Accuracy, mean loss, the expected calibration error (both of softmax(logits / temperature)),
    per-class accuracy (None for a class with no images) and the confusion matrix (rows: true
    class), as plain numbers (JSON-ready)."""
    k = len(classes)
    pairs = labels.cpu() * k + logits.argmax(1)
    confusion = torch.bincount(pairs, minlength=k * k).view(k, k)
    shown = confusion.sum(1).tolist()  # images of each class; a class with none has no accuracy (None)
    per_class = [right / n if n else None for right, n in zip(confusion.diag().tolist(), shown, strict=True)]
    return {
        "accuracy": confusion.diag().sum().item() / len(labels),
        "loss": F.cross_entropy(logits / temperature, labels.cpu()).item(),
        "ece": calibration_error(logits, labels, temperature),
        "temperature": temperature,
        "n": len(labels),
        "per_class": {c: None if v is None else round(v, 6) for c, v in zip(classes, per_class, strict=True)},
        "confusion": confusion.tolist(),
    }


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, **options
) -> dict:
    """`metrics` of the model's predictions on a labelled set; options as for `predict_logits`."""
    return metrics(predict_logits(model, images, mean, std, **options), labels, CLASSES)


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
