"""JPEG augmentation at equal compute: a preset trained with and without `--jpeg-p`, each final
model evaluated on the clean CIFAR-10 test set and on the test set re-encoded as JPEG at q90, q75
and q50 (plain, no TTA), for several seeds.

    python benchmarks/jpeg_robustness.py --data-dir ../shared/cifar10 [--preset quick] [--seeds 0 1 2] \
        [--jpeg-p 0.5] [--jobs 2]

Every run goes through the CLI as a user would run it; `--jobs 2` runs two at a time with one
thread each. Writes benchmarks/results/jpeg_robustness-<preset>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from miniresnet.runtime import describe_machine

ROOT = Path(__file__).resolve().parent.parent
QUALITIES = (None, 90, 75, 50)  # None: the clean test set


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "miniresnet", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"miniresnet {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def one_run(preset: str, seed: int, jpeg_p: float, data_dir: str, threads: int) -> dict:
    """Train one model, then evaluate it on the clean and the compressed test sets."""
    name = f"jpeg-{preset}-p{jpeg_p}-s{seed}"
    out = ROOT / "runs" / "bench" / name
    train = ["train", "--preset", preset, "--seed", str(seed), "--data-dir", data_dir, "--out", str(out)]
    train += ["--overwrite", "--quiet", "--threads", str(threads), "--jpeg-p", str(jpeg_p)]
    summary = json.loads(cli(*train).strip().splitlines()[-1])
    accuracy = {}
    for quality in QUALITIES:
        evaluate = ["evaluate", str(out / "last.pt"), "--data-dir", data_dir, "--json", "--threads", str(threads)]
        evaluate += ["--jpeg-quality", str(quality)] if quality else []
        accuracy["clean" if quality is None else f"q{quality}"] = json.loads(cli(*evaluate))["accuracy"]
    print(json.dumps({"jpeg_p": jpeg_p, "seed": seed, "accuracy": accuracy, "seconds": summary["seconds"]}), flush=True)
    return {"jpeg_p": jpeg_p, "seed": seed, "summary": summary, "accuracy": accuracy, "command": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jpeg-p", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    threads = max(1, 2 // args.jobs)
    work = [(args.preset, seed, p, args.data_dir, threads) for seed in args.seeds for p in (0.0, args.jpeg_p)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: one_run(*job), work))
    table = {}
    for p in (0.0, args.jpeg_p):
        rows = [r["accuracy"] for r in runs if r["jpeg_p"] == p]
        table[str(p)] = {
            key: [statistics.mean(r[key] for r in rows), statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0]
            for key in rows[0]
        }
        cells = "  ".join(f"{k} {100 * m:.2f}±{100 * s:.2f}" for k, (m, s) in table[str(p)].items())
        print(f"jpeg_p {p}: {cells}")
    record = {"machine": describe_machine(torch.device("cpu")), "preset": args.preset, "table": table, "runs": runs}
    out = ROOT / "benchmarks" / "results" / f"jpeg_robustness-{args.preset}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
