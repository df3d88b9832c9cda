"""Fine-tuning against training from scratch on classes the initial model never saw, from 20 to
a few thousand images per class: the protocol behind the `finetune` preset.

    python benchmarks/finetune.py --data-dir ../shared/cifar10 prepare
    python benchmarks/finetune.py --data-dir ../shared/cifar10 base
    python benchmarks/finetune.py --data-dir ../shared/cifar10 search --method finetune --n 100 \\
        --row "lr 0.1=--lr 0.1" --row "body x1=--body-lr-ratio 1"
    python benchmarks/finetune.py --data-dir ../shared/cifar10 final --n 20 100 500
    python benchmarks/finetune.py --data-dir ../shared/cifar10 report

CIFAR-10 is split in two halves written as PNG folders under --work (default /tmp/finetune-work):
BASE, classes 0-4 (airplane, automobile, bird, cat, deer), all their training and test images;
TARGET, classes 5-9 (dog, frog, horse, ship, truck): a pool of the first 4,500 training images of
each class, a validation folder of the last 500 of each (2,500 images, never trained on) and their
5,000 test images. A run trains on n images per class drawn from the pool with its seed (the
first n of a seeded permutation, so a seed's smaller subsets lie inside its larger ones), so
seeds differ in data as well as in initialisation.

`base` trains an initial model once on BASE, seed 0: a Mini-ResNet that has never seen a target
class. There are two (`--base`): `fast`, the `fast` preset (8 epoch equivalents), and `long`, the
SGD recipe with `best`'s augmentation (crops of 4, cutout 12) and Muon for the filters, for 76
epochs, 38 of them at 24x24 (59 equivalents), closer to the shipped `best` model that users
fine-tune from. A base run stopped midway is continued with `miniresnet train --resume` in its
directory; `base` then records it without training again.
`search` runs rows on the validation folder (each row: the search base of its method, then its own
options; 3 seeds), `final` runs the `finetune` preset (from the --base model) and the scratch
recipe chosen for each size (SCRATCH_EPOCHS) on the test folder. Accuracy is always the final
epoch's (with the recipe's flip-translate TTA, and plain). Every run goes into
benchmarks/results/finetune.json as it finishes; runs already there are not rerun, and processes
started side by side on the same rows share them (each claims a run before it starts it). A row
is its options and the recipe they resolve to, so runs of a preset as it once was stay in the
results (`report` prints them) but are neither taken for the preset as it is nor plotted. --jobs 2
runs two trainings at once with one thread each. `report` prints the tables and draws
benchmarks/results/finetune.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from miniresnet.data import load_cifar10
from miniresnet.rundir import write_json
from miniresnet.runtime import describe_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "finetune.json"
BASE_CLASSES, TARGET_CLASSES = range(5), range(5, 10)
POOL, VAL = 4500, 500  # of each target class's 5,000 training images: the first 4,500, the last 500

# The SGD recipe of the other presets with `best`'s crops and cutout, named in full so that the
# recipes below, which start from it and spell out every value they change, mean the same
# whatever `best` becomes.
SGD = "--preset best --optimizer sgd --crop-padding 4 --cutout 12"
# What the search rows start from (a row's options are appended, so they override these). The
# finetune base is the first guess at the preset.
SEARCH_BASE = {
    "finetune": f"{SGD} --init {{base}} --epochs 30 --batch-size 32 --lr 0.05 --warmup 0.1 "
    "--body-lr-ratio 0.1 --downscale-epochs 0 --cutout 0",
    "scratch": f"{SGD} --epochs 60 --batch-size 32 --lr 0.05 --warmup 0.1 --downscale-epochs 0 --cutout 0",
}
# The base models (name: recipe, run directory under WORK/runs).
BASES = {
    "fast": ("--preset fast", "base"),
    "long": (f"{SGD} --optimizer muon --muon-lr 0.05 --epochs 76 --downscale-epochs 38", "base-long"),
}
# The final comparison: the preset as a user runs it, against the scratch recipe the search chose,
# whose epochs depend on the size (with fewer images, scratch keeps gaining for more epochs).
FINAL_METHODS = ("finetune", "scratch")
SCRATCH_EPOCHS = {20: 2400, 100: 300, 500: 200}


def final_options(method: str, n: int) -> str | None:
    """A final's options; None for scratch at a size whose epochs no search has chosen."""
    if method == "finetune":
        return "--preset finetune --init {base}"
    if n not in SCRATCH_EPOCHS:
        return None
    epochs = SCRATCH_EPOCHS[n]
    return f"{SGD} --epochs {epochs} --batch-size 32 --lr 0.1 --warmup 0.1 --downscale-epochs 0 --cutout 0"


# Recorded from each run's config.json: the values that make a recipe.
RECIPE_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "warmup",
    "weight_decay",
    "label_smoothing",
    "init",
    "body_lr_ratio",
    "freeze_epochs",
    "freeze_norm",
    "crop_padding",
    "flip",
    "cutout",
    "downscale_epochs",
    "zero_init_residual",
    "tta",
    "precision",
)


def write_pngs(images: torch.Tensor, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)


def prepare(data_dir: str, work: Path) -> dict:
    """The folder trees (written once): base/{train,test}/<class>/, target/{pool,val,test}/<class>/.
    File names are the image's index within its class and split, so the pool's order is the binary
    files' order."""
    done = work / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    data = load_cifar10(data_dir)
    counts: dict[str, int] = {}
    for c in [*BASE_CLASSES, *TARGET_CLASSES]:
        name = data.classes[c]
        train = data.train_images[data.train_labels == c]
        test = data.test_images[data.test_labels == c]
        if c in BASE_CLASSES:
            parts = {"base/train": train, "base/test": test}
        else:
            parts = {"target/pool": train[:POOL], "target/val": train[POOL:], "target/test": test}
        for split, images in parts.items():
            write_pngs(images, work / split / name, [f"{i:04d}.png" for i in range(len(images))])
            counts[split] = counts.get(split, 0) + len(images)
    record = {"images": counts, "seconds": round(time.perf_counter() - started, 1)}
    write_json(done, record)
    return record


def subset(work: Path, n: int, seed: int) -> Path:
    """n images per target class from the pool, drawn with `seed` (hard links to the pool's files)."""
    folder = work / "subsets" / f"n{n}-seed{seed}"
    if (folder / "done").exists():
        return folder
    for c, class_dir in enumerate(sorted((work / "target" / "pool").iterdir())):
        order = list(range(POOL))
        random.Random(seed * 1000 + c).shuffle(order)
        (folder / class_dir.name).mkdir(parents=True, exist_ok=True)
        for i in sorted(order[:n]):
            link = folder / class_dir.name / f"{i:04d}.png"
            if not link.exists():
                link.hardlink_to(class_dir / f"{i:04d}.png")
    (folder / "done").touch()
    return folder


def base_checkpoint(work: Path, name: str) -> Path:
    return work / "runs" / BASES[name][1] / "last.pt"


def train_base(work: Path, name: str, threads: int) -> dict:
    """Train base model `name` on BASE, or record it if its run already finished (for instance one
    continued with --resume after a stop)."""
    out = base_checkpoint(work, name).parent
    options = [*shlex.split(BASES[name][0]), "--seed", "0", "--dataset", "folder", "--data-dir", str(work / "base")]
    options += ["--cache-dir", str(work / "cache")]
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        command = ["miniresnet", "train", *options, "--eval-every", "0", "--quiet", "--out", str(out)]
        run = run_record(command, out, summary, summary["seconds"])
    else:
        run = train(options, out, threads)
    run["classes"] = json.loads((out / "config.json").read_text())["resolved"]["classes"]
    return run


def train(options: list[str], out: Path, threads: int) -> dict:
    """One `miniresnet train` in a subprocess: its command, summary, recipe and wall time."""
    command = [sys.executable, "-m", "miniresnet", "train", *options]
    command += ["--eval-every", "0", "--quiet", "--threads", str(threads), "--out", str(out), "--overwrite"]
    print("$", shlex.join(command[1:]), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return run_record(command[2:], out, summary, time.perf_counter() - started)


def run_record(command: list[str], out: Path, summary: dict, wall: float) -> dict:
    """What the results keep of a run in `out`: its command, summary, recipe and wall time."""
    config = json.loads((out / "config.json").read_text())
    return {
        "command": command,
        "summary": summary,
        "recipe": {k: config[k] for k in RECIPE_KEYS},
        "machine": config["resolved"]["machine"],
        "train_images": config["resolved"]["train_images"],
        "wall_seconds": round(wall, 1),
    }


def load_results() -> dict:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"search": [], "final": []}
    if "base" in results:  # written when there was one base model, `fast`
        results.setdefault("bases", {})["fast"] = results.pop("base")
        for row in results["search"] + results["final"]:
            row.setdefault("base", "fast" if row["method"] == "finetune" else None)
    return results


def row_recipe(row: dict) -> dict:
    """The recipe a row's runs trained (rows written before rows kept it: their first run's)."""
    return row.get("recipe") or row["runs"][0]["recipe"]


def spread(values: list[float]) -> list[float]:
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarize_row(row: dict) -> dict:
    """A row's mean and stdev over its seeds (accuracy with TTA and plain), and its median times."""
    runs = sorted(row["runs"], key=lambda r: r["seed"])
    return {
        **{k: v for k, v in row.items() if k != "runs"},
        "seeds": [r["seed"] for r in runs],
        "acc": spread([r["summary"]["test_acc"] for r in runs]),
        "acc_plain": spread([r["summary"]["test_acc_plain"] for r in runs]),
        "seconds": statistics.median(r["summary"]["seconds"] for r in runs),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "runs": runs,
    }


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in text).strip("-")


def recipe_of(options: str, base: Path) -> dict:
    """The recipe `options` resolve to with today's presets: what a run of them records."""
    from miniresnet.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["train", *shlex.split(options.format(base=base))]))
    return {k: v for k, v in config.to_dict().items() if k in RECIPE_KEYS}


def run_rows(args: argparse.Namespace, stage: str, rows: list[tuple[str, int, str, str]]) -> None:
    """Runs every (row, seed) not in the results yet; rows are (method, n, label, options).
    stage "search" evaluates on the validation folder, "final" on the test folder."""
    work, base = args.work, base_checkpoint(args.work, args.base)
    if any(method == "finetune" for method, _, _, _ in rows) and not base.exists():
        raise SystemExit(f"no base model at {base}: run the `base --base {args.base}` step first")
    evaluate_on = work / "target" / ("val" if stage == "search" else "test")
    lock = threading.Lock()

    def find(table: list[dict], method: str, n: int, label: str, options: str) -> dict:
        """The row of these runs; fine-tuning rows also by their base (rows from before there were
        two bases started from `fast`), and every row by the recipe its options resolve to, so that
        runs of a preset as it was are not taken for runs of the preset as it is."""
        base_name = args.base if method == "finetune" else None
        recipe = recipe_of(options, base)
        for row in table:
            if (row["method"], row["n"], row["options"], row.get("base")) == (method, n, options, base_name):
                if row_recipe(row) == recipe:
                    return row
        row = {"method": method, "n": n, "label": label, "options": options, "base": base_name, "recipe": recipe}
        table.append(row | {"runs": []})
        return table[-1]

    table = load_results()[stage]
    todo = []
    for method, n, label, options in rows:
        done = {r["seed"] for r in find(table, method, n, label, options)["runs"]}
        todo += [(method, n, label, options, seed) for seed in args.seeds if seed not in done]
    for n in args.n:
        for seed in args.seeds:
            subset(work, n, seed)

    def run(job: tuple[str, int, str, str, int]) -> None:
        method, n, label, options, seed = job
        name = f"{method}-n{n}-{slug(label)}-seed{seed}" + (f"-{args.base}" if method == "finetune" else "")
        claim = work / "claims" / stage / name  # another process may run the same rows: each run once
        claim.parent.mkdir(parents=True, exist_ok=True)
        with lock:
            row = find(load_results()[stage], method, n, label, options)
            if any(r["seed"] == seed for r in row["runs"]):
                return
            try:
                claim.touch(exist_ok=False)
            except FileExistsError:
                return
        try:
            run_one(method, n, label, options, seed, name)
        finally:
            claim.unlink()

    def run_one(method: str, n: int, label: str, options: str, seed: int, name: str) -> None:
        folders = ["--dataset", "folder", "--cache-dir", str(work / "cache")]
        folders += ["--train-folder", str(subset(work, n, seed)), "--test-folder", str(evaluate_on)]
        out = work / "runs" / stage / name
        result = train([*shlex.split(options.format(base=base)), *folders, "--seed", str(seed)], out, args.threads)
        s = result["summary"]
        print(
            f"{stage} {method} n={n} {label} seed {seed}: {s['test_acc']:.4f} "
            f"(plain {s['test_acc_plain']:.4f}) {s['seconds']:.0f} s",
            flush=True,
        )
        with lock:  # read and rewritten after every run: a failure later loses nothing, other steps' runs stay
            results = load_results()
            row = find(results[stage], method, n, label, options)
            row["runs"] = [r for r in row["runs"] if r["seed"] != seed] + [{"seed": seed, **result}]
            save(results)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    print_tables(load_results(), work)


def save(results: dict) -> None:
    for stage in ("search", "final"):
        results[stage] = [summarize_row(row) for row in results[stage] if row["runs"]]
    write_json(RESULTS, results)


def is_current(row: dict, work: Path) -> bool:
    """Whether a final row ran the comparison as it stands: the preset as it is now and the scratch
    recipe now chosen for its size (earlier finals stay in the results, and out of the plot)."""
    options = final_options(row["method"], row["n"])
    base = base_checkpoint(work, row["base"]) if row["method"] == "finetune" else None
    return options is not None and row["options"] == options and row_recipe(row) == recipe_of(options, base)


def print_tables(results: dict, work: Path) -> None:
    """Every row; a final row of an earlier preset or scratch recipe is labelled "(earlier)"."""
    for stage, what in (("search", "validation"), ("final", "test")):
        if not results[stage]:
            continue
        print(f"\n{stage} ({what} accuracy, final epoch, mean ± stdev over seeds)\n")
        print("| method | base | n/class | row | options | seeds | TTA | plain | seconds (median) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(results[stage], key=lambda r: (r["method"], r.get("base") or "", r["n"])):
            (acc, sd), (plain, plain_sd) = r["acc"], r["acc_plain"]
            base = r.get("base") or ""
            label = r["label"] if stage == "search" or is_current(r, work) else f"{r['label']} (earlier)"
            print(
                f"| {r['method']} | {base} | {r['n']} | {label} | `{r['options']}` | {len(r['seeds'])} | "
                f"{acc:.2%} ± {sd:.2%} | {plain:.2%} ± {plain_sd:.2%} | {r['seconds']:.0f} |"
            )


def cpu_kind() -> str:
    """The machine's kind as benchmarks/RESULTS.md names it (its speed depends on it most)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in info.split("\n\n")[0].splitlines():  # the first processor's
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags, model = fields.get("flags", "").split(), fields.get("model", "?")
    if "amx_bf16" in flags:
        return f"AMX Xeon (model {model})"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    return torch.backends.cpu.get_cpu_capability()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines = [("finetune", name, f"finetune preset, from the {name} base model") for name in BASES]
    for method, base, label in [*lines, ("scratch", None, "from scratch, with the epochs chosen for each size")]:
        rows = [r for r in results["final"] if r["method"] == method and r.get("base") == base]
        rows.sort(key=lambda r: r["n"])
        if rows:
            ax.errorbar(
                [r["n"] for r in rows],
                [100 * r["acc"][0] for r in rows],
                yerr=[100 * r["acc"][1] for r in rows],
                marker="o",
                capsize=3,
                label=label,
            )
    ax.set_xscale("log")
    sizes = sorted({r["n"] for r in results["final"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xticks([], minor=True)  # a log axis spanning under two decades labels its minor ticks too
    ax.set_xlabel("training images per class (5 CIFAR-10 classes the base model never saw)")
    ax.set_ylabel("test accuracy, % (final epoch, TTA)")
    ax.set_title(f"Fine-tuning against training from scratch, 3 seeds, {results['cpu_kind']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="directory holding cifar-10-batches-bin/")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-work"), help="folders, cache and runs")
    parser.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="trainings at once")
    parser.add_argument("--threads", type=int, help="threads per training (default: 2 / jobs)")
    parser.add_argument("--base", choices=sorted(BASES), default="long", help="the base model fine-tuning starts from")
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("prepare", help="write the PNG folders")
    steps.add_parser("base", help="train the base model on the 5 base classes")
    for name in ("search", "final"):
        step = steps.add_parser(name)
        step.add_argument("--n", type=int, nargs="+", default=[100], help="images per class")
        step.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    search = steps._name_parser_map["search"]
    search.add_argument("--method", choices=sorted(SEARCH_BASE), required=True)
    search.add_argument("--row", action="append", default=[], metavar="LABEL=OPTIONS", help="a row (repeatable)")
    final = steps._name_parser_map["final"]
    final.add_argument("--method", choices=FINAL_METHODS, nargs="+", default=list(FINAL_METHODS))
    steps.add_parser("report", help="print the tables and draw the plot")
    args = parser.parse_args()

    args.threads = args.threads or 2 // args.jobs
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results()
    if args.step == "prepare":
        results["prepared"] = prepare(args.data_dir, args.work)
        results["machine"] = describe_machine(torch.device("cpu"))
        write_json(RESULTS, results)
    elif args.step == "base":
        prepare(args.data_dir, args.work)
        run = train_base(args.work, args.base, args.threads)
        results = load_results()  # a search may have written meanwhile
        results.setdefault("bases", {})[args.base] = run
        write_json(RESULTS, results)
        s = run["summary"]
        print(f"base {args.base}: test {s['test_acc']:.4f} (plain {s['test_acc_plain']:.4f}), {s['seconds']:.0f} s")
    elif args.step == "search":
        base = SEARCH_BASE[args.method]
        rows = [(label, f"{base} {options}".strip()) for label, _, options in (r.partition("=") for r in args.row)]
        rows = rows or [("search base", base)]
        run_rows(args, "search", [(args.method, n, label, options) for label, options in rows for n in args.n])
    elif args.step == "final":
        unsearched = [n for n in args.n if "scratch" in args.method and final_options("scratch", n) is None]
        if unsearched:
            raise SystemExit(f"no scratch recipe chosen for {unsearched} images per class: search its epochs first")
        run_rows(args, "final", [(m, n, "chosen", final_options(m, n)) for m in args.method for n in args.n])
    else:
        from miniresnet.config import PRESETS

        results["cpu_kind"] = cpu_kind()
        preset = PRESETS["finetune"].to_dict()
        results["chosen"] = {
            "finetune": final_options("finetune", 0),
            "finetune_preset": {k: preset[k] for k in RECIPE_KEYS},
            "scratch": {str(n): final_options("scratch", n) for n in SCRATCH_EPOCHS},
        }
        write_json(RESULTS, results)
        print_tables(results, args.work)
        current = {**results, "final": [row for row in results["final"] if is_current(row, args.work)]}
        plot(current, RESULTS.with_suffix(".png"))


if __name__ == "__main__":
    main()
