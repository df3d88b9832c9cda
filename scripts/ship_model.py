"""Ship a trained run as a pretrained model: src/miniresnet/weights/NAME.safetensors, its card
NAME.json, and MODEL_CARD.md regenerated from every card.

    python scripts/ship_model.py runs/best-s0 best --data-dir ../shared/cifar10 \
        --command "miniresnet train --preset best --seed 0" --commit a312352...
    python scripts/ship_model.py --refresh --data-dir ../shared/cifar10   # the cards' figures again, same files
    python scripts/ship_model.py runs/teacher teacher --to benchmarks/teachers --description "..." ...  # not shipped

The card's test accuracy is the shipped file's own, evaluated here in fp32 on all 10,000 test
images (what `miniresnet evaluate best` prints); the training run's own figures (in the precision
it trained in) are kept beside it. The JPEG figures re-encode every test image at quality 75 with
Pillow and evaluate the files as an image folder, a first look at distribution shift.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from miniresnet import load_model
from miniresnet.calibration import calibration_error
from miniresnet.data import load_cifar10
from miniresnet.evaluate import metrics, predict_logits
from miniresnet.export import export
from miniresnet.files import write_text_atomically
from miniresnet.folders import prepared_folder
from miniresnet.pretrained import DEFAULT_MODEL, WEIGHTS_DIR, sha256_of, shipped_cards
from miniresnet.runtime import describe_machine

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTIONS = {
    "best": "the `best` preset: the most accurate recipe here (200 epochs, the first 100 at 24x24, "
    "Nesterov SGD, label smoothing, cutout, flip-translate TTA)",
    "seed": "the `seed` preset: the spec's recipe exactly (25 epochs, Adam, crop and flip, no TTA)",
    "best-jpeg": "the `best` preset with JPEG augmentation (each epoch, half the training images replaced by one "
    "of 4 JPEG versions at qualities 40-95), distilled from the shipped `best`, which sees each image before "
    "compression (`--teacher best --teacher-sees-original`), and the last 5,000 training images held out to fit "
    "its temperature; then 30 epochs more, the same way, starting from the model that recipe made (warm-up to a "
    "twentieth of the `best` preset's peak learning rate, then linear decay): less accurate than `best` on clean "
    "images, far more on JPEG-compressed ones, and calibrated probabilities",
}


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, tta: str) -> dict:
    logits = predict_logits(model, images, model.mean, model.std, tta=tta)
    return metrics(logits, labels, model.classes)


def jpeg_copy(images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], folder: Path) -> None:
    """The test set as an image folder of quality-75 JPEGs: folder/<class>/<index>.jpg."""
    for name in classes:
        (folder / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / classes[label] / f"{i:05d}.jpg", quality=75)


def portable(text: str, name: str) -> str:
    """A command or note without the training machine's directories: DIR for the data, runs/NAME for
    the run's own directory (--out, --resume), and any other run directory (such as an --init) under
    runs/ by its own name."""
    text = re.sub(r"--data-dir \S+", "--data-dir DIR", text)
    text = re.sub(r"(--out|--resume) \S*/?runs/[\w.-]+", lambda m: f"{m.group(1)} runs/{name}", text)
    return re.sub(r"\S*/runs/([\w.-]+)", r"runs/\1", text)


def calibration(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The shipped file's temperature and its test-set expected calibration error (15 bins, plain)
    with the plain softmax and with the temperature."""
    logits = predict_logits(model, images, model.mean, model.std)
    return {
        "temperature": model.temperature,
        "test_ece": calibration_error(logits, labels),
        "test_ece_calibrated": calibration_error(logits, labels, model.temperature),
    }


def make_card(
    run_dir: Path, name: str, path: Path, data_dir: str, command: str, commit: str, note: str, description: str
) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    data = load_cifar10(data_dir)
    model = load_model(path)
    tta = config["tta"] if config["tta"] != "none" else "flip"
    plain = accuracy(model, data.test_images, data.test_labels, "none")
    with_tta = accuracy(model, data.test_images, data.test_labels, tta)
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_copy(data.test_images, data.test_labels, model.classes, Path(tmp))
        images, labels, _ = prepared_folder(
            Path(tmp), model.classes, 32, Path(tmp) / ".cache", strict=True, progress=False
        )
    jpeg_plain = accuracy(model, images, labels, "none")
    jpeg_tta = accuracy(model, images, labels, tta)
    return {
        "name": name,
        "file": path.name,
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size,
        "description": description,
        "preset_tta": config["tta"],
        "command": portable(command, name) + ("" if "--data-dir" in command else " --data-dir DIR --out runs/" + name),
        "commit": commit,
        "seed": config["seed"],
        "trained_on": config["resolved"]["machine"],
        "trained_in_precision": summary["precision"],
        "train_seconds": summary["seconds"],
        "note": portable(note, name),
        "epochs": summary["epochs"],
        "architecture": model.arch(),
        "parameters": summary["params"],
        "classes": list(model.classes),
        "mean": model.mean.tolist(),
        "std": model.std.tolist(),
        "input": "uint8 RGB 32x32 images; the model takes (pixels / 255 - mean) / std, NCHW",
        "test_accuracy": {
            "plain": plain["accuracy"],
            "tta": with_tta["accuracy"],
            "tta_mode": tta,
            "images": plain["n"],
            "evaluated_in": "fp32",
        },
        "per_class_accuracy": plain["per_class"],
        "jpeg75_test_accuracy": {"plain": jpeg_plain["accuracy"], "tta": jpeg_tta["accuracy"]},
        "calibration": calibration(model, data.test_images, data.test_labels),
        "run_reported": {"test_acc": summary["test_acc"], "test_acc_plain": summary["test_acc_plain"]},
        "teacher": teacher_of(summary),
        "init": init_of(summary),
        "evaluated_on": describe_machine(torch.device("cpu")),
    }


def teacher_of(summary: dict) -> dict | None:
    """What a distilled run learned from: the run's record of its teacher (name, sha256, architecture)
    and, where it has a card for that sha256 (see card_of), its test accuracy, epochs and training time."""
    record = summary.get("teacher")
    if not record:
        return None
    if "members" in record:  # an ensemble: each member as a single teacher is described
        return record | {"members": [teacher_of({"teacher": member}) for member in record["members"]]}
    return with_its_card(record)


def init_of(summary: dict) -> dict | None:
    """What a run started from (--init): the run's record of it (name, sha256) and, where it has a card
    for that sha256 (see card_of), how it was trained. Read before the new card is written, so a model that replaces
    the one it started from records the one it replaced."""
    record = summary.get("init")
    return with_its_card(record) if record else None


def card_of(model: str) -> tuple[str, dict] | tuple[None, None]:
    """The card of a model a run names (a teacher, an initial model) and what it is: a shipped model's
    card, or the card beside a model file (`teacher.json` beside `teacher.safetensors`, as `--to DIR`
    writes for a model kept with the results rather than shipped); (None, None) for any other model."""
    card = shipped_cards().get(model)
    if card:
        return f"the shipped `{model}`", card
    beside = Path(model).with_suffix(".json")
    if Path(model).is_file() and beside.is_file():
        return f"the card {beside}", json.loads(beside.read_text())
    return None, None


def with_its_card(record: dict) -> dict:
    """A teacher's or initial model's record, with its card's figures and recipe where it has a card
    (see card_of) for the same sha256."""
    source, card = card_of(record["model"])
    if card and card["sha256"] == record["sha256"]:
        keys = ("test_accuracy", "epochs", "train_seconds", "command", "commit", "seed")
        record = record | {k: card[k] for k in keys}
    elif card:  # such as shipping a name again after its card was replaced by a model that started from it
        print(
            f"warning: the run used a `{record['model']}` of sha256 {record['sha256'][:12]}, but {source} "
            f"is for {card['sha256'][:12]}: the card names it by its sha256 alone",
            file=sys.stderr,
        )
    return {k: v for k, v in record.items() if k != "classes"}


def teacher_text(card: dict) -> str:
    """The recipe line's sentence about a distilled model's teacher (empty without one)."""
    teacher = card.get("teacher")
    if not teacher:
        return ""
    members = teacher.get("members", [teacher])
    described = " and ".join(member_text(member) for member in members)
    if len(members) == 1:
        return f" It learned from the teacher {described}, whose training counts in its cost too."
    return f" It learned from the mean logits of the teachers {described}; their training counts in its cost too."


def init_text(card: dict) -> str:
    """The recipe line's sentence about the model a run started from (empty when it started from scratch)."""
    start = card.get("init")
    if not start:
        return ""
    text = f" It started from the weights of `{start['model']}` (sha256 `{start['sha256'][:12]}`{recipe_text(start)}"
    if "commit" in start:
        text += f" at commit `{start['commit'][:12]}`"
    return text + "), whose training counts in its cost too."


def member_text(teacher: dict) -> str:
    """One teacher: its name, architecture, sha256 and, where it has a card (see card_of), how it was trained."""
    widths = "/".join(map(str, teacher["arch"]["widths"]))
    return f"`{teacher['model']}` (Mini-ResNet {widths}, sha256 `{teacher['sha256'][:12]}`{recipe_text(teacher)})"


def recipe_text(record: dict) -> str:
    """For a teacher or initial model that with_its_card found a card for: its test accuracy and how it
    was trained, from that card (empty for any other model)."""
    if "test_accuracy" not in record:
        return ""
    accuracy = record["test_accuracy"]
    return (
        f"; {accuracy['plain']:.2%} / {accuracy['tta']:.2%} with TTA on the test set, {record['epochs']} epochs, "
        f"{record['train_seconds']:,.0f} s, trained by `{record['command']}`"
    )


def accuracy_row(name: str, card: dict) -> str:
    test, jpeg, machine = card["test_accuracy"], card["jpeg75_test_accuracy"], card["trained_on"]
    return (
        f"| `{name}` | {test['plain']:.2%} | {test['tta']:.2%} ({test['tta_mode']}) | {jpeg['plain']:.2%} "
        f"| {jpeg['tta']:.2%} | {card['parameters']:,} | {card['train_seconds']:,.0f} s, "
        f"{card['trained_in_precision']}, {machine['cpu']} ({machine['cpu_capability']}) |"
    )


def calibration_text(cards: dict[str, dict]) -> str:
    """What the cards say about how far each model's probabilities can be trusted."""
    parts = []
    for name, card in cards.items():
        c = card.get("calibration")
        if c is None:
            parts.append(f"`{name}`: not measured")
        elif c["temperature"] == 1.0:
            parts.append(
                f"`{name}` is not calibrated (temperature 1): its expected calibration error is {c['test_ece']:.2%}"
            )
        else:
            parts.append(
                f"`{name}` divides its logits by a temperature of {c['temperature']:.3f}, fitted on a validation "
                f"split: its expected calibration error is {c['test_ece_calibrated']:.2%} ({c['test_ece']:.2%} without)"
            )
    return (
        "; ".join(parts) + " (on the test set, 15 confidence bins, no TTA). A run fits its temperature on its "
        "validation split (`--val-split`); a model trained without one keeps the plain softmax, and its "
        "probabilities are then only as honest as the numbers here say."
    )


def threads_text(threads: int) -> str:
    return f"{threads} thread" + ("" if threads == 1 else "s")


def hardest_classes(card: dict, count: int = 3) -> str:
    ranked = sorted(card["per_class_accuracy"].items(), key=lambda item: item[1])
    return ", ".join(f"{name} ({acc:.1%})" for name, acc in ranked[:count])


def model_card_markdown(cards: dict[str, dict]) -> str:
    """MODEL_CARD.md: the prose is fixed here, every figure comes from the cards. The default model
    (`best`) comes first: the examples and the input statistics are its."""
    cards = dict(sorted(cards.items(), key=lambda item: (item[0] != DEFAULT_MODEL, item[0])))
    rows = "\n".join(accuracy_row(name, card) for name, card in cards.items())
    names = list(cards)
    classes = next(iter(cards.values()))["classes"] if cards else []
    per_class = "\n".join(
        f"| {cls} | " + " | ".join(f"{cards[n]['per_class_accuracy'][cls]:.1%}" for n in names) + " |"
        for cls in classes
    )
    recipes = "\n".join(
        f"- `{n}`: {c['description']}. Trained with `{c['command']}` at commit `{c['commit'][:12]}`, "
        f"torch {c['trained_on']['torch']}, {threads_text(c['trained_on']['threads'])}; sha256 `{c['sha256']}`."
        + init_text(c)
        + teacher_text(c)
        + (f" {c['note']}" if c.get("note") else "")
        for n, c in cards.items()
    )
    first = next(iter(cards.values()), None)
    hardest = "; ".join(f"`{name}` is least accurate on {hardest_classes(card)}" for name, card in cards.items())
    mean = ", ".join(f"{v:.4f}" for v in first["mean"]) if first else ""
    std = ", ".join(f"{v:.4f}" for v in first["std"]) if first else ""
    return f"""# Model card: the shipped Mini-ResNets

<!-- Written by scripts/ship_model.py from src/miniresnet/weights/*.json; edit the script, not this file. -->

**What they are.** Trainings of the Mini-ResNet of this repository (a 3x3 stem of 16 channels,
three stages of two residual blocks at 16, 32 and 64 channels joined by stride-2 3x3 convolutions,
global average pooling, one linear layer): {", ".join(f"`{n}`" for n in names)}. Each is a
safetensors file of ~0.9 MB inside the package, loaded by name: `load_model("{names[0]}")`,
`miniresnet predict {names[0]} cat.jpg`,
`torch.hub.load(..., "mini_resnet", pretrained=True, weights="{names[0]}")`.

**For**: classifying small natural photographs into the ten CIFAR-10 classes ({", ".join(classes)}),
as a baseline to compare against, and as a starting point for experiments. **Not for**: anything
outside those ten classes (every image gets one of the ten, with no "none of these"), images
that are not photographs of a single centred object, or any decision about people.

**Probabilities.** {calibration_text(cards)}

**Data.** Trained on the 50,000 CIFAR-10 training images (32x32 RGB photographs, 5,000 per
class), less the last ones where a command holds some out (`--val-split`) to fit a temperature;
evaluated on its 10,000 test images, which no choice of recipe looked at (the presets were tuned
on a 5,000-image validation split of the training set).

**Input.** RGB, 32x32, pixels scaled to [0, 1] and normalised per channel with the mean and std of
the images the model trained on (`{names[0] if names else ""}`: mean ({mean}), std ({std}));
`load_model` returns them as `.mean` and `.std`, and `predict` prepares any image file this way
(largest centred square, resized to 32x32, bicubic).

## Accuracy

On all 10,000 CIFAR-10 test images, evaluated from the shipped file in fp32; the final epoch's
weights, never a best epoch. "JPEG q75" is the same test set re-encoded as JPEG at quality 75 with
Pillow and evaluated as an image folder: a first look at how much a common shift costs.

| model | test | with TTA | JPEG q75 | JPEG q75 with TTA | parameters | training |
|---|---|---|---|---|---|---|
{rows}

Per class (plain, no TTA):

| class | {" | ".join(f"`{n}`" for n in names)} |
|---|{"---|" * len(names)}
{per_class}

## How each was trained

{recipes}

Retraining with the same command gives the same accuracy within seed-to-seed noise (see
`benchmarks/RESULTS.md` for runs of each preset with several seeds); the same weights bit for bit
only on the same CPU kind, thread count and torch version. `scripts/ship_model.py` turns a run into a shipped file and
its card.

## Known limits

- 32x32 inputs: a large photo is shrunk to 32x32 first, so fine detail is gone; it was trained
  only on images whose object fills most of the frame, and other framings are not measured.
- Not every class is as good: {hardest}.
- Compression costs accuracy (the JPEG columns); other shifts (blur, noise, other cameras,
  drawings) are not measured here.
- CIFAR-10's photographs were collected from the web around 2008; what its classes look like
  there is what the model knows.
"""


def refresh_cards(data_dir: str) -> None:
    """Every shipped card's calibration figures measured again from its file, its command and note
    made portable, and MODEL_CARD.md written anew; the weights are untouched."""
    data = load_cifar10(data_dir)
    for name, card in shipped_cards().items():
        card["command"], card["note"] = portable(card["command"], name), portable(card.get("note", ""), name)
        card["calibration"] = calibration(load_model(name), data.test_images, data.test_labels)
        write_text_atomically(WEIGHTS_DIR / f"{name}.json", json.dumps(card, indent=1) + "\n")
        print(json.dumps({"name": name, "command": card["command"], "calibration": card["calibration"]}))
    write_text_atomically(ROOT / "MODEL_CARD.md", model_card_markdown(shipped_cards()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("name", nargs="?")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--command", help="the exact command the run was trained with")
    parser.add_argument("--commit", help="the commit it was trained at")
    parser.add_argument("--note", default="", help="anything a reader of the card should know about the run")
    parser.add_argument("--description", help="what the model is (default: the shipped name's own description)")
    parser.add_argument(
        "--to",
        type=Path,
        default=WEIGHTS_DIR,
        help="write NAME.safetensors and its card NAME.json here instead of shipping them with the package "
        "(such as a teacher kept beside the results); MODEL_CARD.md is then left as it is",
    )
    parser.add_argument("--refresh", action="store_true", help="only measure the shipped cards' figures again")
    args = parser.parse_args()
    if args.refresh:
        refresh_cards(args.data_dir)
        return
    if not (args.run_dir and args.name and args.command and args.commit):
        parser.error("shipping a run needs RUN_DIR NAME --command --commit")
    data = load_cifar10(args.data_dir)
    shipping = args.to.resolve() == WEIGHTS_DIR.resolve()
    description = args.description or DESCRIPTIONS.get(args.name, f"a run of the `{args.name}` preset")
    path = args.to / f"{args.name}.safetensors"
    args.to.mkdir(parents=True, exist_ok=True)
    result = export(load_model(args.run_dir / "last.pt"), "safetensors", path, data.test_images[:256])
    print(f"wrote {path} (checked against PyTorch: max abs logit difference {result['max_abs_logit_diff']:.1e})")
    card = make_card(args.run_dir, args.name, path, args.data_dir, args.command, args.commit, args.note, description)
    write_text_atomically(args.to / f"{args.name}.json", json.dumps(card, indent=1) + "\n")
    if shipping:
        write_text_atomically(ROOT / "MODEL_CARD.md", model_card_markdown(shipped_cards()))
    print(json.dumps({k: card[k] for k in ("name", "test_accuracy", "jpeg75_test_accuracy", "sha256")}))


if __name__ == "__main__":
    main()
