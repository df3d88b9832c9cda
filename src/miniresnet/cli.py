"""`miniresnet` command line: each subcommand parses, calls one function, prints the result.

The train options are generated from TrainConfig's fields, so the CLI and the config cannot drift
apart: `--batch-size` is `batch_size`, `--no-flip` sets `flip=False`, and so on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing

from . import __version__
from .config import PRESETS, RESUMABLE_OVERRIDES, TTA_MODES, TrainConfig
from .data import DATASETS, LABEL_KINDS
from .errors import MiniResNetError
from .pretrained import DEFAULT_MODEL
from .runtime import PRECISIONS

FLAG_ALIASES = {"out_dir": ["--out"]}
MODEL_HELP = "a checkpoint (.pt) from `miniresnet train`, a safetensors export, or a shipped model's name"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; defaults are left to the preset (None = not given)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        help_text = f"{f.metadata['help']} (seed preset: {getattr(PRESETS['seed'], f.name)!r})"
        if kind is bool:
            parser.add_argument(
                flag,
                *FLAG_ALIASES.get(f.name, []),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            scalar = int if typing.get_origin(kind) is tuple else kind
            parser.add_argument(
                flag, *FLAG_ALIASES.get(f.name, []), dest=f.name, default=None, type=scalar, help=help_text, **extra
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from pathlib import Path

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume is None:
        return dataclasses.replace(PRESETS[args.preset or "seed"], **given)
    if args.preset:
        raise MiniResNetError("--resume continues a run with its own config.json; drop --preset")
    saved = load_run_config(args.resume)
    out = given.pop("out_dir", args.resume)  # the run continues where it is; --out may only name that place
    if Path(out).resolve() != Path(args.resume).resolve():
        raise MiniResNetError(f"--resume continues the run in {args.resume} where it is; drop --out {out}")
    changed = sorted(k for k in given if k not in RESUMABLE_OVERRIDES)
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise MiniResNetError(
            f"{flags} cannot change when resuming (only the recipe in {args.resume} is continued); "
            f"options allowed with --resume: "
            + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE_OVERRIDES))
        )
    return dataclasses.replace(saved, **given, out_dir=args.resume)


def load_run_config(run_dir: str) -> TrainConfig:
    from pathlib import Path

    path = Path(run_dir) / "config.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise MiniResNetError(f"there is no run to resume in {run_dir}: {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise MiniResNetError(f"{path} is not a readable run configuration: {e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train import train

    summary = train(config_from_args(args), resume=args.resume is not None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from process 0
        print(json.dumps(summary))
    return 0


def load_for_inference(args: argparse.Namespace):
    """The checkpoint's model on the chosen device, and the autocast dtype to run it in."""
    import torch

    from .checkpoint import load_model
    from .runtime import model_in_precision, resolve_device, resolve_precision, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    precision = resolve_precision(args.precision, device)
    return model_in_precision(model, precision, memory_format=torch.channels_last), device, precision


def model_logits(model, images, args: argparse.Namespace, device, precision):
    """The checkpoint's logits for uint8 images, with the inference options of `args`."""
    from .evaluate import predict_logits

    return predict_logits(
        model,
        images,
        model.mean,
        model.std,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        tta=args.tta,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import metrics

    if args.plots:  # before the work, not after it
        try:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MiniResNetError(f"--plots {args.plots}: cannot make the folder ({e.strerror or e})") from None
    model, device, precision = load_for_inference(args)
    if args.image_folder:
        from .folders import default_cache_dir, prepared_folder

        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        images, labels, _ = prepared_folder(
            Path(args.image_folder), model.classes, model.image_size, cache_dir, strict=True, progress=True
        )
        source = str(args.image_folder)
    else:
        from .data import load_dataset

        data = load_dataset(args.dataset, args.data_dir, args.labels, verify=args.verify_data)
        if data.classes != model.classes:
            raise MiniResNetError(
                f"the model's {len(model.classes)} classes are not {data.name}'s {len(data.classes)}: "
                f"evaluate it on the data it was trained for (--dataset, --labels) or on an --image-folder"
            )
        if args.val_split:
            images, labels, source = validation_split(data, args.val_split, args.checkpoint)
        else:
            images, labels, source = data.test_images, data.test_labels, f"{data.name} test set"
    if args.jpeg_quality is not None:
        from .images import jpeg_roundtrip

        images, source = jpeg_roundtrip(images, args.jpeg_quality), f"{source}, re-encoded as JPEG q{args.jpeg_quality}"
    logits = model_logits(model, images, args, device, precision)
    result = {**metrics(logits, labels, model.classes, model.temperature), "tta": args.tta, "source": source}
    if args.plots:
        from .plots import plot_evaluation

        for path in plot_evaluation(images, labels, logits, result, model.classes, Path(args.plots), source):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    tta = "" if args.tta == "none" else f", {args.tta} TTA"
    print(f"accuracy {result['accuracy']:.4f} on {result['n']:,} images of {source} (loss {result['loss']:.4f}{tta})")
    calibrated = "not calibrated" if model.temperature == 1.0 else f"temperature {model.temperature:.3f}"
    print(f"expected calibration error {result['ece']:.2%} (15 bins; {calibrated})\n")
    print(f"{'class':<12}{'accuracy':>9}")
    for name, acc in result["per_class"].items():
        print(f"{name:<12}{'(none)' if acc is None else format(acc, '.4f'):>9}")  # (none): no images of it
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    print(" " * 12 + "".join(f"{c[:5]:>6}" for c in model.classes))
    for name, row in zip(model.classes, result["confusion"], strict=True):
        print(f"{name:<12}" + "".join(f"{v:>6}" for v in row))
    return 0


def held_out_by(model_source: str) -> int | None:
    """How many of the last training images the model held out, where that is recorded: in a
    checkpoint's config, or in the command of a shipped model's card. None for an export."""
    import shlex
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .pretrained import shipped_cards
    from .safetensors_file import looks_like_safetensors

    path = Path(model_source)
    if path.is_file():
        if looks_like_safetensors(path):
            return None
        config = load_checkpoint(path).get("config")
        held_out = config.get("val_split") if isinstance(config, dict) else None
        return held_out if isinstance(held_out, int) else None
    card = shipped_cards().get(model_source)
    if card is None:
        return None
    return config_from_args(build_parser().parse_args(shlex.split(card["command"])[1:])).val_split


def validation_split(data, n: int, model_source: str):
    """The last `n` training images and their labels, the ones `train --val-split n` holds out, and
    their description. A model that trained on them scores too well on them: say so where the
    model file or card records another split, and that it cannot be checked where neither does."""
    total = len(data.train_labels)
    if n >= total:
        raise MiniResNetError(f"--val-split {n}: {data.name} has only {total:,} training images")
    held_out = held_out_by(model_source)
    if held_out is None:
        print(
            f"note: {model_source} does not record which images it held out; if it trained on these {n:,}, "
            "its figures here flatter it",
            file=sys.stderr,
        )
    elif held_out == 0:
        print(
            f"note: {model_source} held out no training images: it trained on these {n:,}, "
            "so its figures here flatter it",
            file=sys.stderr,
        )
    elif held_out < n:
        print(
            f"note: {model_source} held out {held_out:,} training images, not {n:,}: it trained on "
            f"{n - held_out:,} of these, so its figures here flatter it",
            file=sys.stderr,
        )
    _, (images, labels) = data.split_validation(n)
    return images, labels, f"{data.name} validation split (training images {total - n + 1:,}-{total:,})"


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image; an unreadable file gets its own error line, the rest are still
    predicted, and the exit status is 1 if any file failed."""
    import torch

    from .evaluate import classify
    from .images import display_name, find_images, load_image

    model, device, precision = load_for_inference(args)
    top_k = min(3, len(model.classes)) if args.top_k is None else args.top_k
    if not 1 <= top_k <= len(model.classes):
        raise MiniResNetError(f"--top-k must be between 1 and {len(model.classes)}, got {top_k}")
    files = find_images(args.inputs)
    if not files:
        raise MiniResNetError(f"no image files found in {' '.join(args.inputs)}")
    images, errors = {}, {}
    for f in files:
        try:
            images[f] = load_image(f, model.image_size)
        except MiniResNetError as e:
            errors[f] = str(e)
    ranked = {}
    if images:
        batch = torch.stack(list(images.values()))
        options = dict(batch_size=args.batch_size, device=device, precision=precision, tta=args.tta)
        ranked = dict(zip(images, classify(model, batch, top_k, **options), strict=True))
    for f in files:
        if f in errors:
            if args.json:
                print(json.dumps({"file": str(f), "error": errors[f]}))
            print(f"miniresnet: error: {errors[f]}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"file": str(f), "top_k": [{"class": c, "probability": p} for c, p in ranked[f]]}))
        else:
            print(f"{display_name(f)}: " + ", ".join(f"{c} {p:.1%}" for c, p in ranked[f]))
    if errors:
        print(f"miniresnet: {len(errors)} of {len(files)} files could not be read", file=sys.stderr)
    return 1 if errors else 0


def check_images_for(model, args: argparse.Namespace):
    """The CIFAR data set a model was trained on (by its classes), whose test images check an export."""
    from .data import CLASSES, load_dataset

    if model.image_size == 32 and model.classes == CLASSES:
        return load_dataset("cifar10", args.data_dir, verify=args.verify_data)
    if model.image_size == 32 and len(model.classes) in (100, 20):  # CIFAR-100's fine or coarse classes
        labels = "fine" if len(model.classes) == 100 else "coarse"
        return load_dataset("cifar100", args.data_dir, labels, verify=args.verify_data)
    raise MiniResNetError(
        f"this model's {len(model.classes)} classes at {model.image_size}x{model.image_size} are not CIFAR-10's or "
        "CIFAR-100's: give --image-folder with images to check the export on"
    )


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .export import export
    from .runtime import set_threads

    set_threads(args.threads)
    model = load_model(args.checkpoint)
    size = model.image_size
    if args.image_folder:  # the check's images; their labels do not matter
        import torch

        from .images import find_images, load_image

        files = find_images([args.image_folder])[: args.check_images]
        if not files:
            raise MiniResNetError(f"no image files found in {args.image_folder}")
        images = torch.stack([load_image(f, size) for f in files])
    else:
        images = check_images_for(model, args).test_images[: args.check_images]
    result = export(model, args.format, args.out, images)
    if args.json:
        print(json.dumps(result))
        return 0
    diff = result["max_abs_logit_diff"]
    check = f"max abs logit difference {diff:.2e}" if diff is not None else "no numerical check"
    print(
        f"wrote {result['path']} ({result['bytes']:,} bytes, {args.format}); checked with {result['checked_with']} "
        f"on {result['checked_on_images']} test images: {check}\ninput: {result['input']}; output: logits over "
        f"{', '.join(result['classes'])}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .pretrained import shipped_cards

    cards = shipped_cards()
    if args.json:
        for card in cards.values():
            print(json.dumps(card))
        return 0
    width = max(len("name"), *map(len, cards)) + 2
    print(f"{'name':<{width}}{'test acc':>8}{'with TTA':>10}  {'TTA':<15}{'params':>9}  trained with")
    for name, card in cards.items():
        acc = card["test_accuracy"]
        print(
            f"{name:<{width}}{acc['plain']:>8.2%}{acc['tta']:>10.2%}  {acc['tta_mode']:<15}{card['parameters']:>9,}  "
            f"{card['command']}"
        )
    print("\nUse a name wherever a model file goes: miniresnet predict best cat.jpg; load_model('best').")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, serve
    except ImportError as e:
        raise MiniResNetError(
            f"serve needs the serve extra ({e.name} is missing): pip install 'miniresnet[serve]'"
        ) from None
    config = ServeConfig(
        model=args.model,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        decode_workers=args.decode_workers,
        body_timeout_s=args.body_timeout_s,
        max_connections=args.max_connections,
        keep_alive_s=args.keep_alive_s,
        threads=args.threads,
    )
    from .checkpoint import load_model

    model = load_model(args.model)  # before the server starts: a wrong name or path is one line, no traceback
    serve(config, args.host, args.port, model)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data import RELEASES, download_release

    release = RELEASES[args.dataset]
    path = download_release(release, args.data_dir, url=args.url, progress=not args.quiet)
    print(f"{release.name} is ready in {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .runtime import cpu_has_native_bf16, resolve_device, set_threads

    set_threads(args.threads)
    if args.precision == "all":  # bf16 only where it is native: elsewhere it would fall back to fp32 again
        on_gpu = resolve_device(args.device).type == "cuda"
        bf16 = ["bf16", "bf16-weights"]
        precisions = ["fp32", *bf16, "fp16"] if on_gpu else ["fp32", *bf16] if cpu_has_native_bf16() else ["fp32"]
    else:
        precisions = [args.precision]
    for precision in precisions:
        result = run_bench(
            precision,
            args.batch_size,
            args.steps,
            args.repeats,
            args.device,
            preset=args.preset,
            compile=args.compile,
            cuda_graph=args.cuda_graph,
        )
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        machine = result["machine"]
        caps = [
            f"{name} capped to {machine[key]}"
            for name, key in (("oneDNN", "onednn_isa_cap"), ("MKL", "mkl_isa_cap"))
            if machine[key]
        ]
        print(
            f"{machine['cpu']} ({machine['arch']}; PyTorch kernels {machine['cpu_capability']}"
            f"{'; ' + ', '.join(caps) if caps else ''}; native bf16: {'yes' if machine['native_bf16'] else 'no'})"
        )
        print(
            f"{result['precision']} on {result['device']} ({machine['threads']} threads), "
            f"batch {result['batch_size']}:\n"
            f"  train {result['train_images_per_sec']:8.0f} img/s = {result['train_gflops']:.0f} GFLOP/s, "
            f"{result['efficiency']:.0%} of the {result['matmul_gflops']:.0f} GFLOP/s {result['compute_dtype']} "
            f"matmul roofline\n"
            f"  eval  {result['eval_images_per_sec']:8.0f} img/s ({result['test_eval_seconds']:.2f} s for 10,000)\n"
            f"  one epoch (50,000 train + 10,000 test) ~ {result['epoch_seconds']:.0f} s",
            flush=True,
        )
    return 0


def jpeg_quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a JPEG quality is between 1 and 100, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count_or_zero(text: str) -> int:
    """Threads or workers: a number, or 0 for "as many as the cores"."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (the cores) or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or above, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniresnet", description="Train and use a Mini-ResNet on CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"miniresnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model; last stdout line is a JSON summary")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None, help="starting configuration (default: seed)")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the interrupted run in RUN_DIR from its last.pt, exactly",
    )
    add_config_arguments(train)
    train.set_defaults(run=cmd_train)

    def inference_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
        sub.add_argument(
            "--tta",
            choices=TTA_MODES,
            default="none",
            help="test-time augmentation: mean logits over the image and its mirror (flip), "
            "and their 2-pixel shifts (flip-translate)",
        )
        sub.add_argument("--batch-size", type=positive_int, default=100)
        sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        sub.add_argument("--precision", choices=PRECISIONS, default="fp32", help="auto: bf16 where it is native")
        sub.add_argument("--threads", type=count_or_zero, default=0, help="0 = the cores this process may use")

    evaluate = commands.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix")
    inference_options(evaluate)
    evaluate.add_argument("--dataset", choices=DATASETS, default="cifar10", help="whose test set to evaluate on")
    evaluate.add_argument("--labels", choices=LABEL_KINDS, default="fine", help="CIFAR-100: fine or coarse classes")
    evaluate.add_argument("--data-dir", default="data", help="directory holding cifar-10-batches-bin/ (or the like)")
    evaluated_images = evaluate.add_mutually_exclusive_group()
    evaluated_images.add_argument(
        "--image-folder",
        metavar="DIR",
        help="evaluate on DIR/<class name>/<images> (any of the model's classes) instead of a test set",
    )
    evaluated_images.add_argument(
        "--val-split",
        type=positive_int,
        metavar="N",
        help="evaluate on the last N training images (those `train --val-split N` held out) instead of the test set",
    )
    evaluate.add_argument("--cache-dir", help="where prepared folder images are cached (default ~/.cache/miniresnet)")
    evaluate.add_argument(
        "--plots", metavar="DIR", help="also write DIR/confusion.png, misclassified.png and reliability.png"
    )
    evaluate.add_argument(
        "--jpeg-quality",
        type=jpeg_quality,
        metavar="Q",
        help="re-encode every image as a JPEG of quality Q (1-100) first: accuracy on compressed images",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    evaluate.add_argument(
        "--verify-data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the data files against their published MD5s",
    )
    evaluate.set_defaults(run=cmd_evaluate)

    predict = commands.add_parser("predict", help="top-k classes of image files (PNG, JPEG, HEIC, AVIF, WebP, ...)")
    inference_options(predict)
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or directories of them")
    predict.add_argument(
        "--top-k", type=positive_int, help="classes to show per image (default 3, or every class of a model with fewer)"
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per file")
    predict.set_defaults(run=cmd_predict)

    export = commands.add_parser("export", help="write the model as ONNX, TorchScript or safetensors, checked")
    export.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
    export.add_argument("--format", choices=("onnx", "torchscript", "safetensors"), required=True)
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument(
        "--data-dir", default="data", help="CIFAR-10 or CIFAR-100 (the model's), whose test images the check runs on"
    )
    export.add_argument("--image-folder", metavar="DIR", help="check on the images in DIR instead (any model)")
    export.add_argument("--check-images", type=positive_int, default=256, help="test images to compare logits on")
    export.add_argument(
        "--verify-data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the data files against their published MD5s",
    )
    export.add_argument("--threads", type=count_or_zero, default=0, help="0 = the cores this process may use")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(run=cmd_export)

    report = commands.add_parser("report", help="write RUN_DIR/report.html: figures, plots, per-class table, config")
    report.add_argument("run_dir", help="a directory written by `miniresnet train`")
    report.set_defaults(run=cmd_report)

    models = commands.add_parser("models", help="the shipped pretrained models and their test accuracy")
    models.add_argument("--json", action="store_true", help="print each model's card as one JSON object")
    models.set_defaults(run=cmd_models)

    serve = commands.add_parser("serve", help="an HTTP API and a drag-and-drop page for a model")
    serve.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--max-batch", type=positive_int, default=32, help="images per forward pass, at most")
    serve.add_argument(
        "--max-wait-ms", type=non_negative_float, default=5.0, help="how long a batch waits to fill after its first"
    )
    serve.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests in progress (upload to answer); more get 503"
    )
    serve.add_argument("--max-upload-mb", type=positive_float, default=32.0, help="largest upload accepted (413 above)")
    serve.add_argument("--max-pixels", type=positive_int, default=50_000_000, help="largest image (width x height)")
    serve.add_argument("--decode-workers", type=count_or_zero, default=0, help="images decoding at once; 0 = the cores")
    serve.add_argument(
        "--body-timeout-s", type=positive_float, default=30.0, help="an upload must arrive whole in this (408 after)"
    )
    serve.add_argument("--max-connections", type=positive_int, default=512, help="open connections; more get 503")
    serve.add_argument("--keep-alive-s", type=positive_int, default=5, help="an idle connection closes after this")
    serve.add_argument("--threads", type=count_or_zero, default=0, help="0 = the cores this process may use")
    serve.set_defaults(run=cmd_serve)

    download = commands.add_parser("download", help="fetch and verify CIFAR-10 (binary) or CIFAR-100 (Python) release")
    download.add_argument("--dataset", choices=DATASETS, default="cifar10")
    download.add_argument(
        "--data-dir", default="data", help="where cifar-10-batches-bin/ (or cifar-100-python/) will be"
    )
    download.add_argument("--url", default=None, help="archive URL (default: the official one)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(run=cmd_download)

    bench = commands.add_parser("bench", help="training and evaluation throughput against the matmul roofline")
    bench.add_argument(
        "--precision",
        choices=(*PRECISIONS, "all"),
        default="all",
        help="all = fp32, then bf16 where it is native (and fp16 on a GPU)",
    )
    bench.add_argument("--batch-size", type=positive_int, default=100)
    bench.add_argument("--steps", type=positive_int, default=30, help="training batches per timed repeat")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats after one warm-up; medians")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--threads", type=count_or_zero, default=0, help="0 = the cores this process may use")
    bench.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in the warm-up)")
    bench.add_argument("--preset", choices=tuple(PRESETS), default="seed", help="the recipe whose step is timed")
    bench.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="on a GPU: launch each kernel from Python instead of replaying the step as a recorded CUDA graph",
    )
    bench.add_argument("--json", action="store_true", help="one JSON object per precision")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MiniResNetError as e:
        exit_code = getattr(e, "exit_code", 1)  # an interrupted run says how to resume; not an error
        print(f"miniresnet: {'error: ' if exit_code == 1 else ''}{e}", file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        print("miniresnet: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the system refused a read or a write that no check foresaw: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"miniresnet: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def entry() -> typing.NoReturn:
    """The `miniresnet` program (and `python -m miniresnet`): main(), then its exit status. A
    process torchrun started leaves without Python's teardown (see distributed.exit_worker)."""
    code = main()
    from .distributed import exit_worker, launched_by_torchrun

    if launched_by_torchrun():
        exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
