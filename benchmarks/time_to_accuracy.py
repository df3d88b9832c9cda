"""Test accuracy against wall-clock seconds for the presets' recorded runs (what preset_runs.py
wrote to benchmarks/results/), one line per run, as a PNG for the README.

    python benchmarks/time_to_accuracy.py seed-fp32 fast best --out benchmarks/results/time_to_accuracy.png

Points are the epochs that evaluated the test set, at the wall time since the run started
(data loading included). The last point of a run with TTA is its headline (TTA) accuracy.
"""

from __future__ import annotations

import argparse
import json
from itertools import accumulate

import matplotlib.pyplot as plt

from preset_runs import ROOT


def curve(run: dict) -> tuple[list[float], list[float]]:
    """(seconds, accuracy) at each evaluated epoch; older records without `elapsed` sum `seconds`."""
    metrics = run["metrics"]
    elapsed = [m.get("elapsed") for m in metrics]
    if None in elapsed:
        elapsed = list(accumulate(m["seconds"] for m in metrics))
    points = [(t, m["test_acc"]) for t, m in zip(elapsed, metrics, strict=True) if "test_acc" in m]
    if "test_acc_tta" in metrics[-1]:
        points.append((run["summary"]["seconds"], metrics[-1]["test_acc_tta"]))
    return [t for t, _ in points], [100 * a for _, a in points]


def main() -> None:
    plt.switch_backend("Agg")  # files only: no display needed
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="results files (benchmarks/results/NAME.json)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_to_accuracy.png"))
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for colour, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], args.names, strict=False):
        report = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        for i, run in enumerate(report["runs"]):
            seconds, accuracy = curve(run)
            mean = 100 * report["test_acc_mean"]
            n = len(report["runs"])
            label = f"{name} (mean {mean:.2f}%, {n} seed{'s' * (n > 1)})" if i == 0 else None
            ax.plot(seconds, accuracy, "-o", color=colour, markersize=3, alpha=0.8, label=label)
    ax.axhline(90, color="gray", lw=0.8, ls="--")
    ax.axvline(600, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(40, 95)
    ax.set_xlabel("wall-clock seconds since start (log scale), 2-core CPU")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Mini-ResNet on CIFAR-10: test accuracy against time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
