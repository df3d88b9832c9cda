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
import json
import statistics

import torch

from miniresnet.bench import StepTimer
from miniresnet.config import PRESETS
from miniresnet.runtime import describe_machine, set_threads

VARIANTS = {
    "channels_last eager (default)": dict(channels_last=True, compile=False),
    "NCHW eager": dict(channels_last=False, compile=False),
    "channels_last compiled": dict(channels_last=True, compile=True),
    "NCHW compiled": dict(channels_last=False, compile=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = set_threads(0)
    base = dataclasses.replace(PRESETS["seed"], precision=args.precision)
    cpu = torch.device("cpu")
    runners = {name: StepTimer(dataclasses.replace(base, **v), args.steps, cpu) for name, v in VARIANTS.items()}
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
        "machine": describe_machine(cpu),
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
