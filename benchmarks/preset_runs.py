"""Full training runs of a preset across seeds, through the CLI exactly as a user would run it.

    python benchmarks/preset_runs.py --preset seed --seeds 0 1 --data-dir ../shared/cifar10 -- --precision bf16

Each run's summary and per-epoch metrics land in benchmarks/results/<name>.json, and a line per
run plus the mean and spread are printed: these are the README's accuracy and wall-time figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_run(preset: str, seed: int, data_dir: str, name: str, extra: list[str]) -> dict:
    """One `miniresnet train` in a subprocess; its command, summary and per-epoch metrics."""
    out = ROOT / "runs" / "bench" / name
    command = [
        sys.executable,
        "-m",
        "miniresnet",
        "train",
        "--preset",
        preset,
        "--seed",
        str(seed),
        "--data-dir",
        data_dir,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        *extra,
    ]
    print("$", " ".join(command[1:]), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    machine = config.pop("resolved")["machine"]
    return {
        "seed": seed,
        "command": command[2:],
        "config": config,  # what the command meant when it ran: presets change
        "machine": machine,
        "summary": summary,
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--name", help="results file name (default: PRESET plus the extra options)")
    parser.add_argument("extra", nargs="*", help="more `miniresnet train` options, after --")
    args = parser.parse_args()
    name = args.name or "-".join([args.preset, *(a.lstrip("-") for a in args.extra)]) or args.preset
    runs = []
    for seed in args.seeds:
        run = train_run(args.preset, seed, args.data_dir, f"{name}-seed{seed}", args.extra)
        runs.append(run)
        print(f"seed {seed}: test_acc {run['summary']['test_acc']:.4f}  {run['summary']['seconds']:.0f} s", flush=True)
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    if path.exists():  # keep earlier seeds of the same configuration
        runs += [r for r in json.loads(path.read_text())["runs"] if r["seed"] not in args.seeds]
    runs.sort(key=lambda r: r["seed"])
    accs = [r["summary"]["test_acc"] for r in runs]
    report = {
        "preset": args.preset,
        "extra": args.extra,
        "runs": runs,
        "test_acc_mean": statistics.mean(accs),
        "test_acc_stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seconds_median": statistics.median(r["summary"]["seconds"] for r in runs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{name}: {len(runs)} seeds, test_acc mean {report['test_acc_mean']:.4f} "
        f"(stdev {report['test_acc_stdev']:.4f}), median {report['seconds_median']:.0f} s -> {path}"
    )


if __name__ == "__main__":
    main()
