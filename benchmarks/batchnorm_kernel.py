"""The fused BatchNorm+ReLU kernel against PyTorch's ops, one layer at a time: forward and
backward of relu(batch_norm(x) [+ skip]) in training mode, at each stage's shape of the seed
recipe's step (batch 100, fp32, channels_last), alternating round by round, medians.

    python benchmarks/batchnorm_kernel.py [--rounds 7] [--calls 20] [--tensors 1] [--json]

With --tensors 1 the same tensors are used again and again and stay in the caches; with, say,
--tensors 40 each call gets other tensors (~260 MB at the first stage), as in a real step, where
the activations of a whole batch pass through memory between uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from miniresnet.batchnorm_relu import batchnorm_relu, kernel_available
from miniresnet.runtime import describe_machine, set_threads

SHAPES = [(16, 32), (32, 16), (64, 8)]  # channels, side: the three stages at 32x32 images


def pytorch_ops(bn: nn.BatchNorm2d, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    out = bn(x)
    return torch.relu_(out if skip is None else out.add_(skip))


def activation(shape: tuple[int, ...], requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)


def time_calls(layer, bn, batches, calls: int) -> float:
    """Milliseconds per forward+backward call, cycling through `batches` (x, skip, dy)."""
    start = time.perf_counter()
    for i in range(calls):
        x, skip, dy = batches[i % len(batches)]
        x.grad = None  # stored, not added to: in a network a gradient flows on, it is not summed
        if skip is not None:
            skip.grad = None
        layer(bn, x, skip).backward(dy)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="forward+backward calls per timed round")
    parser.add_argument("--tensors", type=int, default=1, help="distinct input tensors to cycle through")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = set_threads(0)
    if not kernel_available():
        raise SystemExit("the fused kernel could not be built here; nothing to compare")
    layers = {"pytorch": pytorch_ops, "fused": batchnorm_relu}
    rows = []
    for channels, side in SHAPES:
        for with_skip in (False, True):
            shape = (100, channels, side, side)
            batches = [
                (activation(shape, True), activation(shape, True) if with_skip else None, activation(shape))
                for _ in range(args.tensors)
            ]
            bn = nn.BatchNorm2d(channels).to(memory_format=torch.channels_last)
            times: dict[str, list[float]] = {name: [] for name in layers}
            for layer in layers.values():
                time_calls(layer, bn, batches, args.calls)  # warm-up
            for _ in range(args.rounds):
                for name, layer in layers.items():
                    times[name].append(time_calls(layer, bn, batches, args.calls))
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append(
                {
                    "channels": channels,
                    "side": side,
                    "skip": with_skip,
                    "ms": {k: round(v, 3) for k, v in medians.items()},
                    "speedup": round(medians["pytorch"] / medians["fused"], 2),
                }
            )
            if not args.json:
                print(
                    f"{channels:3d} channels {side:2d}x{side:<2d} {'+ skip' if with_skip else '      '}: "
                    f"PyTorch's ops {medians['pytorch']:6.2f} ms, fused {medians['fused']:6.2f} ms "
                    f"({medians['pytorch'] / medians['fused']:.2f}x)",
                    flush=True,
                )
    result = {"machine": describe_machine(torch.device("cpu")), "threads": threads, **vars(args), "rows": rows}
    print(json.dumps(result) if args.json else json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
