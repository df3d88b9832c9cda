"""The project's training loop against a plain PyTorch reference loop of the seed recipe, side by
side in one run, alternating segment by segment, so that machine noise hits both alike.

The reference is what a typical script does: a Dataset that crops, flips and normalises one image
at a time, a DataLoader with one worker process, an fp32 NCHW model. Two flavours of its per-image
transforms are timed: `reference-pil`, the torchvision way (each image a PIL image: pad, crop,
mirror, then to a tensor and normalise), and `reference-tensor`, the same steps as small tensor
operations, a faster baseline. It lives here, not in the package, on purpose: it is the
baseline, not a feature.

A plain script runs with PyTorch's and glibc's defaults, so these two run each in a process of its
own that keeps them (driven over a pipe, one segment at a time). `reference-pil-tuned` is the PIL
loop once more, in this process, under our process-wide settings (`set_threads`: threads, and
glibc's malloc keeping freed memory): the ratio to it is what the loop itself is worth, without
what the settings are worth.

    python benchmarks/vs_reference.py [--steps 50] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from miniresnet.bench import synthetic_data, time_training
from miniresnet.config import PRESETS
from miniresnet.model import MiniResNet
from miniresnet.runtime import cpu_has_native_bf16, describe_machine, set_threads

MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])


class PerImageCifar(Dataset):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, one image per call."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pil: bool) -> None:
        self.pil = pil
        self.images = images.permute(0, 2, 3, 1).numpy() if pil else images  # PIL wants height x width x RGB
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        top, left, mirror = random.randint(0, 8), random.randint(0, 8), random.random() < 0.5
        if self.pil:
            image = ImageOps.expand(Image.fromarray(self.images[i]), border=4, fill=0)
            image = image.crop((left, top, left + 32, top + 32))
            if mirror:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        else:
            tensor = F.pad(self.images[i], (4, 4, 4, 4))[:, top : top + 32, left : left + 32]
            if mirror:
                tensor = tensor.flip(-1)
        tensor = tensor.float() / 255
        return (tensor - MEAN[:, None, None]) / STD[:, None, None], int(self.labels[i])


def reference_segments(steps: int, batch_size: int, pil: bool):
    """A generator: each next() trains `steps` batches of the reference loop and yields images/s."""
    images, labels = synthetic_data(50_000)
    loader = DataLoader(
        PerImageCifar(images, labels, pil), batch_size=batch_size, shuffle=True, num_workers=1, persistent_workers=True
    )
    model = MiniResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        yield steps * batch_size / (time.perf_counter() - start)


def in_plain_process(steps: int, batch_size: int, pil: bool):
    """`reference_segments` run in a fresh process with PyTorch's and glibc's defaults: a generator
    whose each next() has that process train one segment."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: none of this process's settings
    ours, theirs = context.Pipe()
    process = context.Process(target=serve_segments, args=(theirs, steps, batch_size, pil))
    process.start()
    try:
        while True:
            ours.send(True)
            yield ours.recv()
    finally:
        ours.send(False)
        process.join()


def serve_segments(pipe, steps: int, batch_size: int, pil: bool) -> None:
    segments = reference_segments(steps, batch_size, pil)
    while pipe.recv():
        pipe.send(next(segments))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="batches per timed segment")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    references = {
        f"reference-{kind}": in_plain_process(args.steps, args.batch_size, kind == "pil") for kind in ("pil", "tensor")
    }
    threads = set_threads(0)
    device = torch.device("cpu")
    references["reference-pil-tuned"] = reference_segments(args.steps, args.batch_size, pil=True)
    ours = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)  # emulated bf16 is only slower
    configs = {
        p: dataclasses.replace(PRESETS["seed"], precision=p, batch_size=args.batch_size, quiet=True) for p in ours
    }
    rates: dict[str, list[float]] = {name: [] for name in [*references, *ours]}
    try:
        for reference in references.values():
            next(reference)  # warm-up: starts the processes, touches every code path once
        for repeat in range(args.repeats):
            for name, reference in references.items():
                rates[name].append(next(reference))
            for precision, cfg in configs.items():
                rates[precision] += time_training(cfg, args.steps, 1, device)
            print(
                f"repeat {repeat + 1}/{args.repeats}: " + "  ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()),
                flush=True,
            )
    finally:
        for reference in references.values():
            reference.close()  # stops the reference processes
    medians = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "machine": describe_machine(device),
        "threads": threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "median_images_per_sec": {k: round(v, 1) for k, v in medians.items()},
        "speedup": {f"{k}_vs_{ref}": round(medians[k] / medians[ref], 2) for k in ours for ref in references},
        "all_images_per_sec": {k: [round(r, 1) for r in v] for k, v in rates.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result["machine"]))
        for k, v in medians.items():
            ratios = ", ".join(f"{v / medians[ref]:.2f}x {ref}" for ref in references)
            print(f"{k:>16}: median {v:7.0f} img/s  ({ratios})")


if __name__ == "__main__":
    main()
