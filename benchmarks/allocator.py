"""What `runtime.keep_freed_memory` buys: the training loop's images/s and minor page faults per
step under glibc's default malloc and with freed memory kept, in alternating fresh processes
(the setting is process-wide and cannot be undone, so each measurement gets its own process).

    python benchmarks/allocator.py [--steps 30] [--repeats 5] [--precision fp32 bf16] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys

import torch

from miniresnet.bench import time_training
from miniresnet.config import PRESETS
from miniresnet.runtime import available_cores, keep_freed_memory

MODES = ("default", "keep")


def measure(mode: str, precision: str, steps: int) -> dict:
    """One process's figures: a first `time_training` call grows the heap, the second is timed."""
    torch.set_num_threads(available_cores())
    if mode == "keep" and not keep_freed_memory():
        raise SystemExit("this C library has no mallopt: nothing to compare")
    cfg = dataclasses.replace(PRESETS["seed"], precision=precision, quiet=True)
    time_training(cfg, steps, 1, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rates = time_training(cfg, steps, 1, torch.device("cpu"))  # a warm-up pass, then the timed one
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"images_per_sec": rates[0], "faults_per_step": faults / (2 * steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="batches of 100 per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.precision[0], args.steps)))
        return
    runs: dict[str, dict[str, list[dict]]] = {p: {m: [] for m in MODES} for p in args.precision}
    for repeat in range(args.repeats):
        for precision in args.precision:
            for mode in MODES:
                command = [sys.executable, __file__, "--child", mode, "--precision", precision]
                command += ["--steps", str(args.steps)]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[precision][mode].append(json.loads(child.stdout))
            print(
                f"repeat {repeat + 1}/{args.repeats} {precision}: "
                + "  ".join(
                    f"{m} {r[-1]['images_per_sec']:.0f} img/s, {r[-1]['faults_per_step']:.0f} faults/step"
                    for m, r in runs[precision].items()
                ),
                file=sys.stderr,
                flush=True,
            )
    result = {}
    for precision, by_mode in runs.items():
        medians = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in by_mode.items()}
        pairs = zip(by_mode["default"], by_mode["keep"], strict=True)
        ratios = [k["images_per_sec"] / d["images_per_sec"] for d, k in pairs]
        result[precision] = {
            "median": medians,
            "speedup_median": round(statistics.median(ratios), 3),  # of the per-repeat ratios
            "all": by_mode,
        }
    if args.json:
        print(json.dumps(result))
        return
    for precision, r in result.items():
        d, k = r["median"]["default"], r["median"]["keep"]
        print(
            f"{precision}: default {d['images_per_sec']:.0f} img/s ({d['faults_per_step']:.0f} faults/step), "
            f"kept {k['images_per_sec']:.0f} img/s ({k['faults_per_step']:.0f} faults/step): "
            f"x{r['speedup_median']:.3f} (median of per-repeat ratios)"
        )


if __name__ == "__main__":
    main()
