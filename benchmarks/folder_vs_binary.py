"""CIFAR-10 as an image folder against CIFAR-10 from its binary files: the same images, so `fast`
trained on each with the same seed must agree within seed noise. Also times the folder's first
decode-and-cache of 60,000 PNGs against loading it from the cache.

    python benchmarks/folder_vs_binary.py --data-dir ../shared/cifar10 --work /tmp/cifar10-png [--train]

Writes benchmarks/results/folder_vs_binary.json. With --train, the two `fast` runs go side by side
with one thread each (one after the other would take twice the wall time on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from miniresnet.data import load_cifar10
from miniresnet.folders import load_image_folders
from miniresnet.runtime import describe_machine

ROOT = Path(__file__).resolve().parent.parent


def write_png_tree(data, root: Path) -> None:
    """root/{train,test}/<class>/<index>.png, losslessly; index is the image's place in the binary files."""
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        for name in data.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / data.classes[label] / f"{i:05d}.png")


def same_images(folder_images: torch.Tensor, binary_images: torch.Tensor) -> bool:
    """The same multiset of images, whatever the order (the folder orders them by class)."""

    def canonical(images: torch.Tensor) -> list[bytes]:
        return sorted(image.numpy().tobytes() for image in images)

    return folder_images.shape == binary_images.shape and canonical(folder_images) == canonical(binary_images)


def train(args: list[str], out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "miniresnet", "train", "--preset", "fast", "--seed", "0", "--threads", "1"]
    return subprocess.Popen(
        [*command, *args, "--out", str(out), "--overwrite", "--quiet"], stdout=subprocess.PIPE, text=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", type=Path, required=True, help="where the PNG tree, cache and runs go")
    parser.add_argument("--train", action="store_true", help="also train fast on both, side by side")
    args = parser.parse_args()
    data = load_cifar10(args.data_dir)
    record: dict = {"machine": describe_machine(torch.device("cpu"))}
    if not (args.work / "png" / "test").is_dir():
        started = time.perf_counter()
        write_png_tree(data, args.work / "png")
        record["write_png_seconds"] = round(time.perf_counter() - started, 1)
    cache = args.work / f"cache-{time.time_ns()}"  # a fresh cache: the first load decodes every file
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        folder = load_image_folders(
            args.work / "png" / "train", args.work / "png" / "test", cache_dir=cache, progress=False
        )
        timings.append(round(time.perf_counter() - started, 2))
    record["first_load_seconds"], record["cached_load_seconds"] = timings
    record["images"] = len(folder.train_labels) + len(folder.test_labels)
    record["same_train_images"] = same_images(folder.train_images, data.train_images)
    record["same_test_images"] = same_images(folder.test_images, data.test_images)
    print(json.dumps(record), flush=True)
    if args.train:
        runs = {
            "folder": train(
                ["--dataset", "folder", "--data-dir", str(args.work / "png"), "--cache-dir", str(cache)],
                args.work / "run-folder",
            ),
            "binary": train(["--data-dir", args.data_dir], args.work / "run-binary"),
        }
        for name, process in runs.items():
            stdout, _ = process.communicate()
            summary = json.loads(stdout.strip().splitlines()[-1])
            record[name] = {k: summary[k] for k in ("test_acc", "test_acc_plain", "seconds", "precision", "epochs")}
    out = ROOT / "benchmarks" / "results" / "folder_vs_binary.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
