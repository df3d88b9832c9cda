"""Weight averaging ("model soups") of models fine-tuned from one starting model: does the mean of
their weights, one network, beat its members? Set beside the ensemble of the same members (the mean
of their logits, several networks) as the ceiling averaging can hope for.

    python benchmarks/weight_average.py runs/ft-a/last.pt runs/ft-b/last.pt best-jpeg \
        --data-dir ../shared/cifar10 --val-split 5000 --out benchmarks/results/weight-average.json

Every figure is plain fp32 accuracy on the last N training images (those `train --val-split N` held
out), clean and re-encoded as JPEG q75, and their mean, the figure the shipped `best-jpeg` is chosen
on; the test set is not read. Rows: each member, every subset of two or more members (its uniform
soup and its ensemble), and the greedy soup (members in order of their own mean, each kept only if
the soup's mean does not fall). A soup's BatchNorm running statistics are the mean of its members'.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import torch

from miniresnet import load_model
from miniresnet.data import load_dataset
from miniresnet.errors import MiniResNetError
from miniresnet.evaluate import predict_logits
from miniresnet.images import jpeg_roundtrip
from miniresnet.runtime import describe_machine


def averaged(models: list[torch.nn.Module]) -> torch.nn.Module:
    """One model whose floating-point state (weights and BatchNorm statistics) is the mean of
    `models`'; integer state (BatchNorm's batch counters) is the first model's."""
    if len({json.dumps(m.arch(), sort_keys=True) for m in models}) > 1:
        raise MiniResNetError("weight averaging needs models of one architecture (widths, blocks, classes)")
    soup = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            value.copy_(torch.stack([state[key] for state in states]).double().mean(0))
    return soup


def logits_on(shown: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's fp32 logits (as float64) on each set of images in `shown`."""
    return {kind: predict_logits(model, x, model.mean, model.std).double() for kind, x in shown.items()}


def scores(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Percent accuracy on the clean and the q75 images, and their mean."""
    row = {name: 100 * (value.argmax(1) == labels).double().mean().item() for name, value in logits.items()}
    row["mean"] = (row["clean"] + row["q75"]) / 2
    return row


def figures_text(row: dict[str, float]) -> str:
    return f"clean {row['clean']:.2f} q75 {row['q75']:.2f} mean {row['mean']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="checkpoints, safetensors exports or shipped models' names")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--val-split", type=int, required=True, help="evaluate on the last N training images")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two models to average")

    _, (images, labels) = load_dataset("cifar10", args.data_dir).split_validation(args.val_split)
    shown = {"clean": images, "q75": jpeg_roundtrip(images, 75)}
    models = {name: load_model(name) for name in args.models}

    member_logits = {name: logits_on(shown, model) for name, model in models.items()}
    soups = {frozenset([name]): scores(member_logits[name], labels) for name in models}  # a member: its own soup
    rows = [{"members": [name], **soups[frozenset([name])]} for name in models]
    for size in range(2, len(models) + 1):
        for names in itertools.combinations(models, size):
            soups[frozenset(names)] = scores(logits_on(shown, averaged([models[n] for n in names])), labels)
            ensemble = scores({k: sum(member_logits[n][k] for n in names) for k in shown}, labels)
            rows.append({"members": list(names), **soups[frozenset(names)], "ensemble": ensemble})

    by_mean = sorted(models, key=lambda name: -soups[frozenset([name])]["mean"])
    greedy, best = by_mean[:1], soups[frozenset(by_mean[:1])]["mean"]
    for name in by_mean[1:]:  # every subset's soup is scored above: the greedy soup only looks them up
        trial = soups[frozenset([*greedy, name])]["mean"]
        if trial >= best:
            greedy, best = [*greedy, name], trial

    for row in rows:
        kind = "member" if len(row["members"]) == 1 else "soup  "
        line = f"{kind} {' + '.join(row['members'])}: {figures_text(row)}"
        if "ensemble" in row:
            line += f"   ensemble: {figures_text(row['ensemble'])}"
        print(line)
    print(f"greedy soup: {' + '.join(greedy)} (mean {best:.2f})")
    record = {
        "machine": describe_machine(torch.device("cpu")),
        "val_split": args.val_split,
        "rows": rows,
        "greedy_soup": {"members": greedy, "mean": best},
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
