"""The shipped-model figures of one or more models, side by side: accuracy on the clean images
(plain and with flip-translate TTA) and on the same images re-encoded as JPEG at q90, q75 and q50
(plain), each with its expected calibration error, in fp32, on the CIFAR-10 test set and, with
`--val-split N`, on the last N training images (those `train --val-split N` held out, where
models are compared without the test set).

    python benchmarks/model_figures.py runs/a/last.pt runs/b/last.pt best-jpeg --data-dir ../shared/cifar10 \
        --val-split 5000 --out benchmarks/results/figures.json

A name `a,b` is the ensemble of those models, the mean of their logits (uncalibrated): what a
student of `--teacher a,b` learns from.

The figures are those of `miniresnet evaluate MODEL --precision fp32 [--tta flip-translate]
[--jpeg-quality Q] [--val-split N]`, computed here with each set of images encoded once for all
models. Prints a table and writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from miniresnet import load_model
from miniresnet.data import load_dataset
from miniresnet.evaluate import metrics, predict_logits
from miniresnet.images import jpeg_roundtrip
from miniresnet.loss import teacher_names
from miniresnet.runtime import describe_machine, model_in_precision, resolve_precision

QUALITIES = (90, 75, 50)
COLUMNS = ("clean", "clean_tta", *(f"q{q}" for q in QUALITIES))


def image_sets(data, val_split: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The evaluated images by split: the test set, and the last `val_split` training images."""
    sets = {"test": (data.test_images, data.test_labels)}
    if val_split:
        sets["val"] = data.split_validation(val_split)[1]
    return sets


def figures(members: list, images: torch.Tensor, labels: torch.Tensor, compressed: dict, fp32) -> dict:
    """{column: {"accuracy", "ece"}} for one model (in fp32) on one split. Several `members` (an
    ensemble, as `--teacher a,b` uses one) answer with the mean of their logits, uncalibrated."""
    row = {}
    for column in COLUMNS:
        shown = compressed[int(column[1:])] if column.startswith("q") else images
        tta = "flip-translate" if column == "clean_tta" else "none"
        logits = [predict_logits(m, shown, m.mean, m.std, precision=fp32, tta=tta).double() for m in members]
        temperature = members[0].temperature if len(members) == 1 else 1.0
        result = metrics(sum(logits) / len(logits), labels, members[0].classes, temperature)
        row[column] = {"accuracy": result["accuracy"], "ece": result["ece"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="checkpoints, safetensors exports or shipped models' names; a,b: their ensemble"
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--val-split", type=int, default=0, help="also evaluate on the last N training images")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    data = load_dataset("cifar10", args.data_dir)
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    models = {name: [load_model(member) for member in teacher_names(name)] for name in args.models}
    models = {
        name: [model_in_precision(m, fp32, memory_format=torch.channels_last) for m in members]
        for name, members in models.items()
    }
    table = {name: {} for name in args.models}
    for split, (images, labels) in image_sets(data, args.val_split).items():
        compressed = {q: jpeg_roundtrip(images, q) for q in QUALITIES}
        for name, members in models.items():
            table[name][split] = figures(members, images, labels, compressed, fp32)
            row = table[name][split]
            cells = "  ".join(f"{c} {100 * v['accuracy']:.2f} (ECE {100 * v['ece']:.2f})" for c, v in row.items())
            print(f"{split:<5} {name}: {cells}", flush=True)
    record = {"machine": describe_machine(torch.device("cpu")), "val_split": args.val_split, "figures": table}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
