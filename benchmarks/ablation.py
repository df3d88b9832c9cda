"""What each trick of a recipe buys, measured on a validation split held out of the training set
(never on the test set): the preset (plus --common options) as it is, then one row per variant,
each over several seeds, reported as mean ± stdev.

    python benchmarks/ablation.py --data-dir ../shared/cifar10 --seeds 0 1 2 --jobs 2 \\
        --common "--epochs 8 --downscale-epochs 4 --downscale-size 16" \\
        --variant "alternating flip=--alternate-flip" --variant "+ EMA=--ema 0.99"

--jobs N runs N trainings at once with 2/N threads each (on 2 cores, two 1-thread runs finish
sooner together than one after the other). Runs already in the results file
(benchmarks/results/<name>.json) are kept and not rerun, so rows can be added later.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

from miniresnet.rundir import write_json
from preset_runs import ROOT, train_run


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def row_summary(label: str, options: str, runs: list[dict]) -> dict:
    """Mean and spread over seeds of a row's validation accuracy (with the preset's TTA, and plain)."""

    def spread(key: str) -> tuple[float, float]:
        values = [r["summary"][key] for r in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "label": label,
        "options": options,
        "seeds": [r["seed"] for r in runs],
        "val_acc": spread("val_acc"),
        "val_acc_plain": spread("val_acc_plain"),
        "seconds": statistics.median(r["summary"]["seconds"] for r in runs),
        "runs": runs,
    }


def table(labels: dict[str, str], done: dict[tuple[str, int], dict]) -> list[dict]:
    """One row per set of options (labelled), over the seeds run so far."""
    rows = []
    for options, label in labels.items():
        runs = sorted((run for (o, _), run in done.items() if o == options), key=lambda run: run["seed"])
        if runs:
            rows.append(row_summary(label, options, runs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--common", default="", help="`miniresnet train` options of every row, the base included")
    parser.add_argument("--val-split", type=int, default=5000, help="validation images held out of training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="trainings at once")
    parser.add_argument("--no-base", action="store_true", help="only the variants (the base row is in the file)")
    parser.add_argument("--name", help="results file benchmarks/results/<name>.json (default: ablation-PRESET)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=OPTIONS",
        help="a row: its label, '=', then the `miniresnet train` options that make it",
    )
    args = parser.parse_args()
    name = args.name or f"ablation-{args.preset}"
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    common = ["--val-split", str(args.val_split), "--eval-every", "0", *shlex.split(args.common)]
    threads = ["--threads", str(2 // args.jobs)]
    earlier = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if earlier.get("common", common) != common:
        raise SystemExit(f"{path} holds rows made with --common {earlier['common']}; use another --name")
    done = {(row["options"], run["seed"]): run for row in earlier["rows"] for run in row["runs"]}

    variants = ([] if args.no_base else ["base="]) + args.variant
    wanted = [(label, options) for label, _, options in (v.partition("=") for v in variants)]
    todo = [(label, options, seed) for label, options in wanted for seed in args.seeds if (options, seed) not in done]

    labels = {row["options"]: row["label"] for row in earlier["rows"]} | {o: label for label, o in wanted}
    lock = threading.Lock()

    def run(job: tuple[str, str, int]) -> None:
        label, options, seed = job
        extra = common + shlex.split(options) + threads
        result = train_run(args.preset, seed, args.data_dir, f"{name}-{slug(label)}-seed{seed}", extra)
        s = result["summary"]
        print(f"{label} seed {seed}: val {s['val_acc']:.4f} (plain {s['val_acc_plain']:.4f})", flush=True)
        with lock:  # the file is rewritten after every run, so a failure later loses nothing
            done[options, seed] = result
            write_json(path, {"preset": args.preset, "common": common, "rows": table(labels, done)})

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    rows = table(labels, done)

    print(f"\n{args.preset} {' '.join(common)}\n")
    print("| variant | options | seeds | val plain | val TTA | seconds (median) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (plain, plain_sd), (tta, tta_sd) = r["val_acc_plain"], r["val_acc"]
        print(
            f"| {r['label']} | `{r['options']}` | {len(r['seeds'])} | {plain:.2%} ± {plain_sd:.2%} | "
            f"{tta:.2%} ± {tta_sd:.2%} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
