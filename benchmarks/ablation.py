"""What each trick of a preset buys, measured on a validation split held out of the training set
(never on the test set): the preset as it is, then the preset with one option changed per row.

    python benchmarks/ablation.py --data-dir ../shared/cifar10 --epochs 10 \
        --variant "no label smoothing=--label-smoothing 0" --variant "+ EMA=--ema 0.99"

Writes benchmarks/results/ablation-<preset>.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import shlex

from preset_runs import ROOT, train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, help="shorten every run to this many epochs")
    parser.add_argument("--val-split", type=int, default=5000, help="validation images held out of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file benchmarks/results/<name>.json (default: ablation-PRESET)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=OPTIONS",
        help="a row: its label, '=', then the `miniresnet train` options that make it",
    )
    args = parser.parse_args()
    common = ["--val-split", str(args.val_split)] + (["--epochs", str(args.epochs)] if args.epochs else [])
    rows = []
    for variant in [f"{args.preset} as is=", *args.variant]:
        label, _, options = variant.partition("=")
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        run = train_run(
            args.preset,
            args.seed,
            args.data_dir,
            f"{args.name or 'ablation-' + args.preset}-{slug}",
            common + shlex.split(options),
        )
        s = run["summary"]
        rows.append(
            {
                "label": label,
                "options": options,
                "val_acc": s["val_acc"],
                "val_acc_plain": s["val_acc_plain"],
                "seconds": s["seconds"],
                "run": run,
            }
        )
        print(f"{label}: val_acc {s['val_acc']:.4f} (plain {s['val_acc_plain']:.4f})  {s['seconds']:.0f} s", flush=True)
    path = ROOT / "benchmarks" / "results" / f"{args.name or 'ablation-' + args.preset}.json"
    path.write_text(json.dumps({"preset": args.preset, "common": common, "seed": args.seed, "rows": rows}, indent=1))
    base = rows[0]["val_acc"]
    header = f"variant (seed {args.seed}, {' '.join(common)})"
    print(f"\n| {header} | options | val acc (TTA) | plain | vs preset | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | `{r['options']}` | {r['val_acc']:.2%} | {r['val_acc_plain']:.2%} | "
            f"{(r['val_acc'] - base) * 100:+.2f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
