"""Honest probabilities: a model's softmax is often over- or under-confident (label smoothing makes
it under-confident). One temperature T, fitted on held-out logits (the validation split, never the
test set), divides the logits before the softmax: the ranking and the accuracy are unchanged, and
the probabilities mean what they say. The expected calibration error measures how far they are:
the gap between confidence and accuracy over 15 equal-width confidence bins, weighted by the
share of images in each. Everything here is computed in float64, so it is the same on every CPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted T outside this means the logits carry no usable signal


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The T > 0 that minimises the cross-entropy of softmax(logits / T) on these labels. The loss
    is unimodal in log T, so a golden-section search over TEMPERATURE_RANGE finds it to ~1e-6.
    None when the minimum is at an end of the range: these labels give no temperature to fit (every
    image right, so a smaller T always lowers the loss; or logits that carry no signal)."""
    logits, labels = logits.double().cpu(), labels.cpu()
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one labelled image")

    def loss(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > 1e-6:
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    fitted = math.exp((low + high) / 2)
    smallest, largest = TEMPERATURE_RANGE
    return fitted if smallest * 1.001 < fitted < largest / 1.001 else None


def reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = BINS) -> list[dict]:
    """Per confidence bin ([k/bins, (k+1)/bins), the last one closed): how many images, their mean
    confidence (top-1 probability) and their accuracy; empty bins have count 0 and no means."""
    probabilities = (logits.double().cpu() / temperature).softmax(1)
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels.cpu()).double()
    which = (confidence * bins).long().clamp(max=bins - 1)
    out = []
    for k in range(bins):
        members = which == k
        n = int(members.sum())
        out.append(
            {
                "low": k / bins,
                "high": (k + 1) / bins,
                "count": n,
                "confidence": confidence[members].mean().item() if n else None,
                "accuracy": correct[members].mean().item() if n else None,
            }
        )
    return out


def calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = BINS) -> float:
    """The expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
    total = len(labels)
    return sum(
        b["count"] / total * abs(b["accuracy"] - b["confidence"])
        for b in reliability(logits, labels, temperature, bins)
        if b["count"]
    )
