"""The reduced decode of large photos (images.py: JPEG draft mode, else box reduction) against the
full decode, side by side in one process: how long preparing a phone-size photo takes each way,
and whether the shipped model answers the same.

    python benchmarks/photo_decode.py --data-dir ../shared/cifar10 [--images 1000] [--side 3000] [--rounds 15]

Speed: a 4000x3000 JPEG (q90) and a 4000x3000 PNG, each prepared alternately with the reduced and
the full decode, `--rounds` times; medians and their ratio. Accuracy: the first `--images` CIFAR-10
test images, each upscaled to `--side` pixels (bicubic) and saved as JPEG q90, prepared both ways
and classified by the shipped `best` model (plain, no TTA). Writes benchmarks/results/photo_decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from miniresnet import images, load_model
from miniresnet.data import load_cifar10
from miniresnet.evaluate import classify
from miniresnet.runtime import describe_machine, set_threads

ROOT = Path(__file__).resolve().parent.parent


def photo_bytes(image: torch.Tensor, size: tuple[int, int], fmt: str) -> bytes:
    """A 32x32 uint8 image upscaled (bicubic) to `size` and encoded as `fmt` (JPEG at q90)."""
    big = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def prepare(data: bytes, reduced: bool) -> torch.Tensor:
    """load_image with the reduced decode, or with it switched off (a margin no image reaches)."""
    images.REDUCE_MARGIN = 4 if reduced else 1_000_000
    try:
        return images.load_image(data)
    finally:
        images.REDUCE_MARGIN = 4


def timed(data: bytes, reduced: bool) -> float:
    started = time.perf_counter()
    prepare(data, reduced)
    return time.perf_counter() - started


def speed(sample: torch.Tensor, rounds: int) -> dict:
    result = {}
    for fmt in ("JPEG", "PNG"):
        data = photo_bytes(sample, (4000, 3000), fmt)
        fast, full = [], []
        for _ in range(rounds):  # alternating, so drift in the machine's speed hits both alike
            fast.append(timed(data, True))
            full.append(timed(data, False))
        result[fmt] = {
            "bytes": len(data),
            "reduced_ms": 1000 * statistics.median(fast),
            "full_ms": 1000 * statistics.median(full),
            "speedup": statistics.median(full) / statistics.median(fast),
        }
        print(f"{fmt} 4000x3000: {result[fmt]}", flush=True)
    return result


def accuracy(data_dir: str, n: int, side: int) -> dict:
    cifar = load_cifar10(data_dir, verify=False)
    model = load_model("best")
    reduced, full = [], []
    for k, image in enumerate(cifar.test_images[:n]):
        data = photo_bytes(image, (side, side), "JPEG")
        reduced.append(prepare(data, True))
        full.append(prepare(data, False))
        if (k + 1) % 100 == 0:
            print(f"{k + 1}/{n} photos prepared", flush=True)
    labels = cifar.test_labels[:n]
    top1 = {}
    for name, batch in (("reduced", reduced), ("full", full)):
        predicted = [cifar.classes.index(ranked[0][0]) for ranked in classify(model, torch.stack(batch), 1)]
        top1[name] = (torch.tensor(predicted) == labels).float().mean().item()
    differ = (torch.stack(reduced).float() - torch.stack(full).float()).abs().mean().item()
    return {
        "images": n,
        "side": side,
        "accuracy_reduced": top1["reduced"],
        "accuracy_full": top1["full"],
        "difference_points": 100 * (top1["reduced"] - top1["full"]),
        "mean_abs_pixel_difference": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "photo_decode.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    sample = load_cifar10(args.data_dir, verify=False).test_images[0]
    result = {"machine": describe_machine(torch.device("cpu")), "speed": speed(sample, args.rounds)}
    result["accuracy"] = accuracy(args.data_dir, args.images, args.side)
    print(json.dumps(result["accuracy"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
