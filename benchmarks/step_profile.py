"""Where a training step's time goes on this CPU: `torch.profiler` over a preset's step (by
default the seed recipe's: batch 100, Adam; the loader included), self time per operator, grouped
into convolutions, BatchNorm, ReLU, adds, the optimizer and the rest.

    python benchmarks/step_profile.py [--preset seed] [--size 32] [--steps 20] [--precision fp32] [--nchw] [--json]

Self time is each operator's own time, without what it calls, so the groups add up to the whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from torch.profiler import ProfilerActivity, profile

from miniresnet.bench import StepTimer
from miniresnet.config import PRESETS
from miniresnet.runtime import describe_machine, set_threads

GROUPS = {  # the first group whose words appear in an operator's name takes its time
    "convolution backward": ("convolution_backward",),
    "convolution forward": ("convolution", "conv2d"),
    "BatchNorm": ("batch_norm",),
    "ReLU": ("relu", "threshold_backward"),
    "residual adds": ("aten::add",),
}


def group_of(event) -> str:
    """An operator called by the optimizer (Muon's matmuls, SGD's adds) counts as the optimizer's."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer (step and zero_grad)"
        parent = parent.cpu_parent
    for group, words in GROUPS.items():
        if any(word in event.name for word in words):
            return group
    return "the rest (loader, loss, allocation)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=32, help="image side the step trains at (16: a downscaled epoch)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = set_threads(0)
    cfg = dataclasses.replace(PRESETS[args.preset], precision=args.precision, channels_last=not args.nchw)
    timer = StepTimer(cfg, args.steps, torch.device("cpu"))
    timer.loader.resize_to = args.size  # the loader leaves images at their own size untouched
    timer()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        images_per_sec = timer()
    seconds: dict[str, float] = {}
    for event in profiler.events():
        group = group_of(event)
        seconds[group] = seconds.get(group, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    shares = {group: round(s / total, 4) for group, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    result = {
        "machine": describe_machine(torch.device("cpu")),
        "threads": threads,
        "preset": args.preset,
        "batch_size": cfg.batch_size,
        "image_size": args.size,
        "precision": args.precision,
        "memory_format": "NCHW" if args.nchw else "channels_last",
        "steps": args.steps,
        "images_per_sec_while_profiled": round(images_per_sec, 1),
        "shares": shares,
        "convolution_share": round(sum(v for k, v in shares.items() if k.startswith("convolution")), 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result["machine"]))
        for group, share in shares.items():
            print(f"{group:>48}: {share:6.1%}")
        print(f"{'convolutions':>48}: {result['convolution_share']:6.1%}")


if __name__ == "__main__":
    main()
