"""How the training step's machinery choices compare on this CPU: memory layout (channels_last or
NCHW) and eager or torch.compile, each the seed recipe's step (batch 100, Adam, fp32 unless told),
side by side in one process, alternating round by round so that machine noise hits all alike.

    python benchmarks/cpu_choices.py [--steps 20] [--rounds 7] [--precision fp32] [--json]

None of these choices changes what the recipe computes (only the rounding of float32 sums); the
question is which is fastest where. Prints each variant's median images/s and its ratio to the
default (channels_last, eager).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import torch

from miniresnet.bench import MEAN, STD, synthetic_data
from miniresnet.config import PRESETS
from miniresnet.loader import BatchLoader
from miniresnet.model import MiniResNet
from miniresnet.runtime import describe_machine, resolve_precision, set_threads
from miniresnet.train import build_optimizer, learning_rate, train_steps

VARIANTS = {
    "channels_last eager (default)": dict(channels_last=True, compile=False),
    "NCHW eager": dict(channels_last=False, compile=False),
    "channels_last compiled": dict(channels_last=True, compile=True),
    "NCHW compiled": dict(channels_last=False, compile=True),
}


class StepTimer:
    """Trains `steps` batches of `cfg`'s step on a model of its own per call; returns images/s."""

    def __init__(self, cfg, steps: int) -> None:
        images, labels = synthetic_data(cfg.batch_size * steps)
        options = dict(shuffle=True, crop_padding=4, flip=True, channels_last=cfg.channels_last)
        self.loader = BatchLoader(images, labels, cfg.batch_size, MEAN, STD, **options)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = MiniResNet(cfg.widths, cfg.blocks_per_stage).to(memory_format=memory_format)
        self.optimizer = build_optimizer(self.model, cfg)
        self.precision = resolve_precision(cfg.precision, torch.device("cpu"))
        self.model_to_train = torch.compile(self.model) if cfg.compile else self.model
        self.lr_at_step = functools.partial(learning_rate, cfg, steps_per_epoch=len(self.loader))
        self.epoch = 0

    def __call__(self) -> float:
        self.loader.set_epoch(self.epoch)
        start = time.perf_counter()
        steps = train_steps(
            self.model_to_train, self.optimizer, self.loader, self.lr_at_step, self.epoch, precision=self.precision
        )
        for _ in steps:
            pass
        self.epoch += 1
        return len(self.loader.labels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = set_threads(0)
    base = dataclasses.replace(PRESETS["seed"], precision=args.precision)
    runners = {name: StepTimer(dataclasses.replace(base, **v), args.steps) for name, v in VARIANTS.items()}
    for run in runners.values():
        run()  # warm-up (and compilation)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for round_number in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(run())
        print(f"round {round_number + 1}: " + "  ".join(f"{k}: {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    default = medians["channels_last eager (default)"]
    result = {
        "machine": describe_machine(torch.device("cpu")),
        "threads": threads,
        "precision": args.precision,
        "steps": args.steps,
        "rounds": args.rounds,
        "median_images_per_sec": {k: round(v, 1) for k, v in medians.items()},
        "vs_default": {k: round(v / default, 3) for k, v in medians.items()},
        "all_images_per_sec": {k: [round(r, 1) for r in v] for k, v in rates.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result["machine"]))
        for k, v in medians.items():
            print(f"{k:>30}: median {v:6.0f} img/s  ({v / default:.3f}x the default)")


if __name__ == "__main__":
    main()
