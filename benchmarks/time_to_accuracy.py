"""Test accuracy against compute and against wall-clock time for the presets' recorded runs (what
preset_runs.py wrote to benchmarks/results/), one line per run, as a PNG for the results.

    python benchmarks/time_to_accuracy.py "seed-fp32=AMD EPYC, AVX-512-BF16" quick-4eq fast-8eq \\
        "best=AMD EPYC, AVX-512-BF16" --out benchmarks/results/time_to_accuracy.png

Left: accuracy against full-resolution epoch equivalents (an epoch at 16x16 counts 0.25, at 24x24
0.5625), a measure that holds on any machine. Right: against wall time since the run started,
which depends on the machine: each line's label names the CPU (or GPU) its runs were measured on
(as recorded with the run, or given after '=' for records that predate that). Points are the epochs that
evaluated the test set; the last point of a run with TTA is its headline (TTA) accuracy. A run's
configuration is the one it recorded (its config.json), never its command read with today's presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import accumulate

import matplotlib.pyplot as plt

from miniresnet.config import TrainConfig
from preset_runs import ROOT


def run_config(run: dict) -> TrainConfig:
    """The configuration a recorded run resolved when it ran (preset_runs.py keeps it)."""
    if "config" not in run:
        raise SystemExit(f"seed {run['seed']}: no recorded configuration; rerun it with preset_runs.py")
    return TrainConfig.from_dict(run["config"])


def curves(run: dict) -> tuple[list[float], list[float], list[float]]:
    """(epoch equivalents, seconds, accuracy %) at each evaluated epoch; older records without
    `elapsed` sum `seconds`."""
    cfg = run_config(run)
    metrics = run["metrics"]
    elapsed = [m.get("elapsed") for m in metrics]
    if None in elapsed:
        elapsed = list(accumulate(m["seconds"] for m in metrics))
    points = [
        (dataclasses.replace(cfg, epochs=m["epoch"]).epoch_equivalents(), t, m["test_acc"])
        for t, m in zip(elapsed, metrics, strict=True)
        if "test_acc" in m
    ]
    if "test_acc_tta" in metrics[-1]:
        points.append((points[-1][0], run["summary"]["seconds"], metrics[-1]["test_acc_tta"]))
    return [e for e, _, _ in points], [t for _, t, _ in points], [100 * a for _, _, a in points]


def machine_of(run: dict) -> str:
    """The GPU a run trained on, else its CPU and the instruction set PyTorch's kernels used."""
    machine = run.get("machine")
    if not machine:
        return "machine not recorded"
    return machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_capability']}"


def main() -> None:
    plt.switch_backend("Agg")  # files only: no display needed
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="results files (benchmarks/results/NAME.json), each NAME[=CPU]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_to_accuracy.png"))
    parser.add_argument(
        "--title", default="Mini-ResNet on CIFAR-10: test accuracy against compute and time, every preset"
    )
    args = parser.parse_args()
    fig, (by_compute, by_time) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, entry in zip(colours, args.names, strict=False):
        name, _, cpu = entry.partition("=")
        report = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        n = len(report["runs"])
        mean = 100 * report["test_acc_mean"]
        for i, run in enumerate(report["runs"]):
            equivalents, seconds, accuracy = curves(run)
            style = dict(color=colour, marker="o", markersize=3, alpha=0.8)
            first = i == 0
            by_compute.plot(
                equivalents,
                accuracy,
                label=f"{name} (mean {mean:.2f}%, {n} seed{'s' * (n > 1)})" if first else None,
                **style,
            )
            by_time.plot(seconds, accuracy, label=f"{name}: {cpu or machine_of(run)}" if first else None, **style)
    for ax in (by_compute, by_time):
        ax.axhline(90, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    by_compute.set_ylim(40, 95)
    by_compute.set_ylabel("test accuracy (%)")
    by_compute.set_xlabel("full-resolution epoch equivalents (log scale)")
    by_time.set_xlabel("wall-clock seconds since start (log scale); 2 CPU cores unless a GPU is named")
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
