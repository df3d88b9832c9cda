"""The pictures people would rather look at than read: learning curves, the confusion matrix and
the most confidently misclassified images. matplotlib is an optional extra (`miniresnet[plots]`);
without it every caller gets the same one-line hint instead of a plot."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .errors import MiniResNetError
from .files import atomic_path

NO_MATPLOTLIB = "plots need matplotlib: pip install 'miniresnet[plots]'"


def literal(text: str) -> str:
    """`text` shown as it is: matplotlib reads a pair of $ as math (and fails on some of it)."""
    return text.replace("$", r"\$")


def have_matplotlib() -> bool:
    try:
        return importlib.import_module("matplotlib") is not None
    except ImportError:
        return False


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MiniResNetError(NO_MATPLOTLIB) from None
    return plt


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss, accuracy and learning rate against epoch, one panel each, from metrics.jsonl records."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for split, style in (("train", "-"), ("test", "-o"), ("val", "-s")):
        points = [(m["epoch"], m[f"{split}_loss"], m[f"{split}_acc"]) for m in history if f"{split}_acc" in m]
        if points:
            epochs, losses, accs = zip(*points, strict=True)
            loss_ax.plot(epochs, losses, style, label=split, markersize=3)
            acc_ax.plot(epochs, [100 * a for a in accs], style, label=split, markersize=3)
    lr_ax.plot([m["epoch"] for m in history], [m["lr"] for m in history], "-", color="tab:gray")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy (%)"), (lr_ax, "learning rate (at epoch start)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    return _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: tuple[str, ...], path: str | Path, title: str = "") -> Path:
    """Each row normalised to sum to 1 (the share of a true class given each prediction)."""
    plt = _pyplot()
    counts = torch.tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    side = 6.5 if k <= 20 else min(20.0, 2.5 + 0.16 * k)  # 100 classes still get a legible label each
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    label_size = 10 if k <= 20 else 5
    names = [literal(c) for c in classes]
    ax.set_xticks(range(k), names, rotation=45 if k <= 20 else 90, ha="right", fontsize=label_size)
    ax.set_yticks(range(k), names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k if k <= 20 else 0):  # numbers in the cells only while they fit
        for j in range(k):
            if shares[i, j] >= 0.005:
                ax.text(
                    j,
                    i,
                    f"{shares[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: str | Path) -> Path:
    """The reliability diagram: per confidence bin, the accuracy (bars) against the mean confidence
    (a calibrated model's bars reach the diagonal), with the share of images in each bin below."""
    from .calibration import calibration_error, reliability

    plt = _pyplot()
    bins = reliability(logits, labels, temperature)
    width = bins[0]["high"] - bins[0]["low"]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    top.bar(centres, [b["accuracy"] or 0 for b in bins], width=width * 0.95, color="#3a7bd5", label="accuracy")
    top.bar(
        centres,
        [(b["confidence"] or 0) - (b["accuracy"] or 0) for b in bins],
        bottom=[b["accuracy"] or 0 for b in bins],
        width=width * 0.95,
        color="#e8a33d",
        alpha=0.6,
        label="gap to the mean confidence",
    )
    top.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--", label="calibrated")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    ece = calibration_error(logits, labels, temperature)
    top.set_title(f"reliability (temperature {temperature:.3g}): expected calibration error {ece:.2%}")
    bottom.bar(centres, [b["count"] / len(labels) for b in bins], width=width * 0.95, color="grey")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("share of images")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def plot_misclassified(
    images: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    classes: tuple[str, ...],
    path: str | Path,
    count: int = 24,
) -> Path:
    """A grid of the wrong predictions the model was surest of, with true and predicted labels."""
    plt = _pyplot()
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:count]
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst.tolist(), strict=False):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        true, guess = literal(classes[labels[i]]), literal(classes[predicted[i]])
        ax.set_title(f"true {true}\npred {guess} {confidence[i]:.0%}", fontsize=8)
    fig.suptitle(f"most confident mistakes ({len(wrong):,} wrong of {len(labels):,})", fontsize=10)
    return _save(fig, path)


def plot_evaluation(
    images: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    result: dict,
    classes: tuple[str, ...],
    out_dir: Path,
    source: str,
) -> list[Path]:
    """An evaluation's three pictures: out_dir/confusion.png, misclassified.png and reliability.png."""
    title = f"{literal(source)}: accuracy {result['accuracy']:.2%}"
    return [
        plot_confusion(result["confusion"], classes, out_dir / "confusion.png", title),
        plot_misclassified(images, labels, logits, classes, out_dir / "misclassified.png"),
        plot_reliability(logits, labels, result.get("temperature", 1.0), out_dir / "reliability.png"),
    ]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    except OSError as e:  # a folder that cannot be made or written: say where, once
        raise MiniResNetError(f"cannot write the plot {path}: {e.strerror or e}") from None
    finally:
        _pyplot().close(fig)
    return path
