"""train(config) -> summary: the whole training run, top to bottom.

Load the data once into memory, build the model and optimizer, then for each epoch: one pass of
augmented batches, an evaluation on the test set (and the validation split, if any), one line of
metrics.jsonl and a checkpoint. The summary's accuracy is the final epoch's, never the best one.

A run can stop and carry on: `last.pt` holds everything the next step depends on (see
checkpoint.training_checkpoint), the data order comes from (seed, epoch) alone, so
`train(cfg, resume=True)` continues exactly where the checkpoint left off. It continues on the
data it was trained on only: the checkpoint records the classes, image size, mean and std and a
SHA-256 of the images and labels, and a resume on other data is refused (see check_resumed_data).
SIGINT and SIGTERM finish the current step, save, and stop.

Names: `model` is the plain MiniResNet the optimizer updates; `model_to_train` is what the steps
run (the model itself, or its DistributedDataParallel and/or torch.compile wrapper, sharing its
weights); `model_to_use` is what is evaluated and saved as the run's weights (the EMA average when
EMA is on, else the model).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import channel_stats, normalize
from .calibration import calibration_error, fit_temperature
from .checkpoint import restore_training, save_checkpoint, training_checkpoint
from .config import RESUMABLE_OVERRIDES, TrainConfig
from .data import ImageSet, load_dataset
from .distributed import Distributed, init_distributed, shutdown_distributed, sync_batchnorm
from .ema import EMA
from .errors import MiniResNetError
from .evaluate import metrics, predict_logits
from .loader import BatchLoader
from .lookahead import Lookahead
from .loss import TrainingLoss, load_teacher, refuse_other_teacher
from .model import MiniResNet, count_macs, count_parameters, whiten_stem
from .muon import MuonSGD
from .rundir import (
    StopSignals,
    TrainingInterrupted,
    open_run_dir,
    start_run_dir,
    tensorboard_writer,
    write_json,
    write_metrics,
    write_plots,
)
from .runtime import (
    Precision,
    autocast,
    available_cores,
    describe_machine,
    log,
    model_in_precision,
    resolve_device,
    resolve_precision,
    set_threads,
)
from .step import GraphStep


class NonFiniteLoss(MiniResNetError):
    """The training loss became NaN or infinite at `step` (of its epoch, counted from 1)."""

    def __init__(self, step: int, value: str) -> None:
        super().__init__(f"the training loss became {value} at step {step}")
        self.step, self.value = step, value


# Steps between read-backs of an epoch's running sums: the progress bar's cadence, and the most
# steps a NaN loss can go unnoticed (it is always noticed before a checkpoint is written).
READ_EVERY = 20


@dataclass
class EpochTally:
    """The current epoch's progress and running sums; mid-epoch checkpoints carry it, so a resumed
    epoch starts at the right batch and reports the same loss and accuracy as an unbroken one.

    `add` keeps the sums on the training device: reading a number back each step would make a GPU
    wait for its queue of kernels every step. `read` brings them back (`loss_sum` and `correct`
    are as of the last read) and raises NonFiniteLoss if a loss since the last read was not finite.
    The float64 sum adds the same numbers in the same order as a sum on the host would."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    on_device: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one step's batch: its mean loss, its predictions and its labels."""
        loss = loss.detach()
        if self.on_device is None:
            device = loss.device
            self.on_device = {
                "loss_sum": torch.tensor(self.loss_sum, dtype=torch.float64, device=device),
                "correct": torch.tensor(self.correct, dtype=torch.int64, device=device),
                "first_bad_step": torch.tensor(-1, dtype=torch.int64, device=device),
                "bad_loss": torch.tensor(0.0, dtype=torch.float64, device=device),
            }
        sums = self.on_device
        self.step += 1
        self.seen += len(labels)
        sums["loss_sum"] += loss.double() * len(labels)
        sums["correct"] += (logits.argmax(1) == labels).sum()
        first_bad = ~torch.isfinite(loss) & (sums["first_bad_step"] < 0)
        sums["first_bad_step"] = torch.where(first_bad, self.step, sums["first_bad_step"])
        sums["bad_loss"] = torch.where(first_bad, loss.double(), sums["bad_loss"])

    def read(self, ddp: Distributed = Distributed()) -> EpochTally:
        """Bring the sums back to the host (one wait for the device). Every process calls it at the
        same steps: if any process's loss was not finite, all of them raise NonFiniteLoss."""
        if self.on_device is None:
            return self
        sums = self.on_device
        self.loss_sum, self.correct = sums["loss_sum"].item(), sums["correct"].item()
        mine = sums["first_bad_step"].item()
        earliest = -ddp.max(-mine if mine > 0 else -math.inf)  # the first bad step of any process
        if math.isfinite(earliest):
            raise NonFiniteLoss(int(earliest), f"{sums['bad_loss'].item()}" if mine > 0 else "non-finite")
        return self


@dataclass
class Progress:
    """Where a run stands: each finished epoch's metrics, the current epoch's tally, the best
    validation accuracy so far, and the seconds spent by the process(es) before a resume."""

    history: list[dict] = field(default_factory=list)
    tally: EpochTally = field(default_factory=EpochTally)
    best_val: float = -1.0
    earlier_seconds: float = 0.0
    temperature: float = 1.0  # fitted on the validation split after the last epoch


@dataclass
class TrainingData:
    """The images a run uses, as uint8 tensors: the training images (less the validation split),
    the sets evaluated after epochs ({"test": ..., "val": ...}), the training set's statistics, the
    class names and data set name, the whole data set's fingerprint (see data_fingerprint), and
    with JPEG augmentation the training images' compressed versions (V, N, 3, H, W)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    mean: torch.Tensor
    std: torch.Tensor
    classes: tuple[str, ...]
    name: str
    fingerprint: str
    jpeg_versions: torch.Tensor | None = None


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with `resume`, continue) the training `cfg` describes; returns the summary.
    Under torchrun, every process calls this and they share the work (see distributed.py)."""
    cfg = with_detected_dataset(cfg)
    cfg.validate()
    ddp, device = init_distributed(resolve_device(cfg.device))
    try:
        summary = run_training(cfg, resume, ddp, device)
        ddp.barrier()  # process 0 writes the plots and summary last; the others wait, then all leave together
        return summary
    finally:
        if ddp.enabled:
            shutdown_distributed()


def with_detected_dataset(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with dataset "folder" when it asks for CIFAR-10 but its --data-dir is laid out as image
    folders (train/<class>/...) and holds no CIFAR-10: what the user meant, said in the log."""
    from .data import holds_release
    from .folders import holds_image_folders

    data_dir = Path(cfg.data_dir)
    if cfg.dataset != "cifar10" or holds_release("cifar10", data_dir) or not holds_image_folders(data_dir):
        return cfg
    if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 speaks for all
        log(f"{data_dir} holds image folders (train/<class>/...) and no CIFAR-10: training on them (--dataset folder)")
    return dataclasses.replace(cfg, dataset="folder")


def run_training(cfg: TrainConfig, resume: bool, ddp: Distributed, device: torch.device) -> dict:
    """Set up, restore, loop over the epochs, finish."""
    started = time.perf_counter()
    say = log if ddp.is_main else lambda _message: None
    if cfg.batch_size % ddp.world_size:
        raise MiniResNetError(
            f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {ddp.world_size} processes"
        )
    out = Path(cfg.out_dir)
    saved = open_run_dir(out, cfg.epochs, resume, cfg.overwrite, ddp.is_main)  # the checkpoint to resume, or None
    threads = set_threads(cfg.threads or max(1, available_cores() // ddp.local_world_size))
    precision = resolve_precision(cfg.precision, device)  # what runs: `auto`, or a fallback, decides
    torch.manual_seed(cfg.seed)

    # The data, the model and what trains it.
    if saved:
        refuse_another_recipe(saved, cfg, out)
        note = how_the_work_changed(out, precision.name, ddp.world_size)
        if note:
            say(note)
    data = prepare_data(cfg)
    if saved:  # before the model is shaped by the data: a resume on other data stops here, with the reason
        note = check_resumed_data(saved, data, cfg, out)
        if note:
            say(note)
    loader = BatchLoader(
        data.train_images,
        data.train_labels,
        cfg.batch_size,
        data.mean,
        data.std,
        shuffle=True,
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        alternate_flip=cfg.alternate_flip,
        cutout=cfg.cutout,
        seed=cfg.seed,
        device=device,
        channels_last=cfg.channels_last,
        dtype=precision.weights,
        rank=ddp.rank,
        world_size=ddp.world_size,
        jpeg_versions=data.jpeg_versions,
        jpeg_p=cfg.jpeg_p,
        originals_too=cfg.teacher_sees_original,
    )
    if loader.left_out:
        n = len(data.train_labels)
        say(
            f"each epoch leaves out {loader.left_out} of its {n:,} training images (other ones each epoch): its last "
            f"batch of {n % cfg.batch_size} is cut to a multiple of the {ddp.world_size} processes, which take equal "
            "shares of every batch"
        )
    model = MiniResNet(cfg.widths, cfg.blocks_per_stage, len(data.classes), zero_init_residual=cfg.zero_init_residual)
    if cfg.stem_init == "whitened":  # from a fixed 5,000 training images: the same filters on every process
        whiten_stem(model, normalize(data.train_images[:5000], data.mean, data.std))
    origin = saved.get("init") if saved else None  # a resumed fine-tuning does not read its initial model again
    if cfg.init and not saved:
        origin = load_initial_weights(model, cfg, data.classes)
        kept = "all its layers" if origin["kept_last_layer"] else "all but its last layer (new, for these classes)"
        say(
            f"starting from {cfg.init} (sha256 {origin['sha256'][:12]}...): {kept}; the input is normalised with "
            "this data's own mean and std"
        )
    params, macs = count_parameters(model), count_macs(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model_in_precision(model, precision, device, memory_format)
    if cfg.sync_bn and ddp.enabled:
        model = sync_batchnorm(model)
    model_to_train = wrap_for_training(model, cfg.compile, ddp, device)
    optimizer = build_optimizer(model, cfg)
    loss_fn, teacher_record = training_loss(cfg, data, device, precision, memory_format, resuming=bool(saved))
    if saved:
        refuse_other_teacher(teacher_record, saved.get("teacher"), out)
    if teacher_record:
        say(teacher_line(cfg, teacher_record))
    # fp16 (CUDA only) needs its loss scaled, or small gradients underflow to zero; off otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    ema = EMA(model, cfg.ema) if cfg.ema else None
    model_to_use = ema.model if ema else model

    # Where the run stands: restored from its checkpoint, or a fresh start that records its config.
    progress = Progress()
    if saved:
        progress = restore_progress(saved, ddp)
        restore_training(saved, model, optimizer, ema, scaler, device)
        step = progress.tally.step
        say(f"resuming {out} after epoch {saved['epoch']}" + (f", step {step}" if step else ""))
    graph_step = graph_step_for(cfg, model_to_train, optimizer, loss_fn, precision, ddp, device, say)  # after restore
    if not saved and ddp.is_main:
        start_run_dir(out)  # only now, once the new run has its data, model and teacher
        resolved = {
            "device": str(device),
            "data": data.name,
            "data_fingerprint": data.fingerprint,
            "classes": list(data.classes),
            "threads": threads,
            "precision": precision.name,
            "cuda_graph": graph_step is not None,
            "machine": describe_machine(device),
            "train_images": len(data.train_labels),
            "val_images": cfg.val_split,
            "params": params,
            "macs": macs,
            "mean": data.mean.tolist(),
            "std": data.std.tolist(),
            "torch": torch.__version__,
            "processes": ddp.world_size,
            "init": origin,
            "teacher": teacher_record,
        }
        write_json(out / "config.json", {**cfg.to_dict(), "resolved": resolved})
    if ddp.is_main:
        write_metrics(out, progress.history)
    processes = f" x {ddp.world_size} processes" if ddp.enabled else ""
    say(
        f"MiniResNet{cfg.widths}: {params:,} parameters, {macs / 1e6:.1f}M MACs/image; {len(data.train_labels):,} "
        f"training images on {device} ({threads} threads{processes}, {precision.name})"
    )

    def checkpoint(epochs_done: int, tally: EpochTally) -> dict:
        """The checkpoint's contents; every process calls this (the epoch's sums are added up across
        them). Reading the tally first means a non-finite loss raises here, before it is saved."""
        tally.read(ddp)
        loss_sum, correct, seen = ddp.sum([tally.loss_sum, tally.correct, tally.seen])
        summed = {"step": tally.step, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}
        seconds = progress.earlier_seconds + time.perf_counter() - started
        return training_checkpoint(
            model,
            optimizer,
            ema,
            scaler,
            epoch=epochs_done,
            tally=summed,
            history=progress.history,
            best_val=progress.best_val,
            seconds=seconds,
            classes=data.classes,
            image_size=cfg.image_size,
            mean=data.mean,
            std=data.std,
            data_fingerprint=data.fingerprint,
            config=cfg.to_dict(),
            device=device,
            init=origin,
            teacher=teacher_record,
            temperature=progress.temperature,
        )

    # The epochs.
    lr_at_step = functools.partial(learning_rate, cfg, steps_per_epoch=len(loader))
    eval_options = dict(
        batch_size=cfg.eval_batch_size, device=device, precision=precision, channels_last=cfg.channels_last
    )
    final_ttas = ("none", cfg.tta) if cfg.tta != "none" else ("none",)  # evaluated after the last epoch
    test_logits, test_result = None, None
    tensorboard = tensorboard_writer(out) if cfg.tensorboard and ddp.is_main else None
    with StopSignals() as signals:
        for epoch in range(len(progress.history), cfg.epochs):
            loader.set_epoch(epoch)
            loader.resize_to = cfg.downscale_size if epoch < cfg.downscale_epochs else None
            epoch_start = time.perf_counter()
            tally = progress.tally  # from a mid-epoch checkpoint, or a fresh one
            first_step = tally.step  # 0, or where a resumed epoch picks up
            steps = train_steps(
                model_to_train,
                optimizer,
                loader,
                lr_at_step,
                epoch,
                tally,
                precision=precision,
                loss_fn=loss_fn,
                ema=ema,
                scaler=scaler,
                ddp=ddp,
                progress_bar=None if cfg.quiet or not ddp.is_main else f"epoch {epoch + 1}/{cfg.epochs}",
                body_lr_scale=0.0 if epoch < cfg.freeze_epochs else cfg.body_lr_ratio,
                frozen_norm=cfg.freeze_norm,
                graph_step=graph_step,
            )
            try:
                for tally in steps:
                    stop = agreed_stop(signals, ddp, due=read_due(tally.step, len(loader)))
                    mid_epoch_save = cfg.checkpoint_every and tally.step % cfg.checkpoint_every == 0
                    if stop or (mid_epoch_save and tally.step < len(loader)):
                        save(out / "last.pt", checkpoint(epoch, tally), ddp)
                    if stop:
                        raise TrainingInterrupted(stop, out, epoch, tally.step)
            except NonFiniteLoss as e:
                lr = lr_at_step(epoch * len(loader) + e.step - 1)
                kept = f"; the last good checkpoint is {out / 'last.pt'}" if (out / "last.pt").exists() else ""
                raise MiniResNetError(
                    f"{e} of epoch {epoch + 1} (lr {lr:.3g}, {precision.name}). Lower --lr or add a warm-up"
                    + (" (--warmup)" if cfg.schedule == "linear" else " (--schedule linear --warmup 0.1)")
                    + (", or use --precision fp32" if precision.name not in ("fp32", "fp64") else "")
                    + kept
                ) from None
            train_seconds = time.perf_counter() - epoch_start
            tally.read(ddp)
            loss_sum, correct, seen = ddp.sum([tally.loss_sum, tally.correct, tally.seen])
            progress.tally = EpochTally()

            lr = lr_at_step(epoch * len(loader))
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen}
            last = epoch + 1 == cfg.epochs
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                scores, plain_logits, test_logits, test_result = evaluate_sets(
                    model_to_use, data, final_ttas if last else ("none",), ddp, **eval_options
                )
                record |= scores
                if last:  # the probabilities' calibration, on the validation split alone
                    progress.temperature = fitted_temperature(plain_logits, data)
                    record |= calibration_record(plain_logits["test"], data.eval_sets["test"][1], progress.temperature)
            record["seconds"] = time.perf_counter() - epoch_start
            record["elapsed"] = progress.earlier_seconds + time.perf_counter() - started
            trained_share = (len(loader) - first_step) / len(loader)  # a resumed epoch timed only its own steps
            record["images_per_sec"] = loader.images_per_epoch * trained_share / train_seconds
            progress.history.append(record)
            improved = record.get("val_acc", -1.0) > progress.best_val
            progress.best_val = max(progress.best_val, record.get("val_acc", progress.best_val))

            state = checkpoint(epoch + 1, progress.tally)
            save(out / "last.pt", state, ddp)
            if improved:  # with its own epoch's temperature (the run's is fitted after the last epoch)
                save(out / "best.pt", state | {"temperature": fitted_temperature(plain_logits, data)}, ddp)
            if ddp.is_main:
                write_metrics(out, progress.history)
            if tensorboard:
                for key, value in record.items():
                    tensorboard.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                tensorboard.flush()
            say(epoch_line(record, cfg.epochs))
            stop = agreed_stop(signals, ddp)
            if stop and not last:  # this epoch's checkpoint is saved already
                raise TrainingInterrupted(stop, out, epoch + 1, 0)
    if tensorboard:
        tensorboard.close()

    # The results.
    if test_result is None:  # resumed after the last epoch's checkpoint but before its results were written
        _, _, test_logits, test_result = evaluate_sets(model_to_use, data, final_ttas, ddp, **eval_options)
    # test_eval.json and reliability.png at the model's temperature, fitted after that evaluation ran
    test_labels = data.eval_sets["test"][1]
    test_result = metrics(test_logits, test_labels, data.classes, progress.temperature) | {"tta": test_result["tta"]}
    final = progress.history[-1]
    if "test_ece" in final:  # absent when a checkpoint from before calibration is resumed at its end
        say(calibration_line(final, calibrated="val" in data.eval_sets))
    seconds = progress.earlier_seconds + time.perf_counter() - started
    summary = summarize(cfg, progress, precision, device, params, out, seconds)
    summary |= ({"init": origin} if origin else {}) | ({"teacher": teacher_record} if teacher_record else {})
    if ddp.is_main:
        write_json(out / "test_eval.json", test_result, indent=None)
        test_images = data.eval_sets["test"][0]
        write_plots(out, progress.history, test_images, test_labels, test_logits, test_result, data.classes)
        write_json(out / "summary.json", summary)
    return summary


def save(path: Path, state: dict, ddp: Distributed) -> None:
    """Every process calls this; process 0 writes, and nobody moves on (or exits) until it has."""
    if ddp.is_main:
        save_checkpoint(state, path)
    ddp.barrier()


def prepare_data(cfg: TrainConfig) -> TrainingData:
    """The data set (CIFAR downloaded first when it is missing and downloads are allowed; image
    folders decoded or read from their cache), split into training images and the sets to
    evaluate, with the training images' channel statistics."""
    if cfg.dataset == "folder":
        from .folders import folder_dataset

        data = folder_dataset(
            cfg.data_dir,
            cfg.train_folder,
            cfg.test_folder,
            test_fraction=cfg.test_fraction,
            image_size=cfg.image_size,
            cache_dir=cfg.cache_dir or None,
            strict=cfg.strict,
            progress=not cfg.quiet,
        )
    else:
        data = load_dataset(
            cfg.dataset, cfg.data_dir, cfg.labels, verify=cfg.verify_data, download=cfg.download, progress=not cfg.quiet
        )
    cfg.validate(train_size=len(data.train_labels))
    (train_images, train_labels), held_out = data.split_validation(cfg.val_split)
    eval_sets = {"test": (data.test_images, data.test_labels)}
    if cfg.val_split:
        eval_sets["val"] = held_out
    mean, std = channel_stats(train_images)
    versions = None
    if cfg.jpeg_p > 0:  # JPEG augmentation is data: compressed versions beside the originals, made once
        from .folders import cached_jpeg_versions

        versions = cached_jpeg_versions(
            train_images, cfg.jpeg_versions, cfg.jpeg_qualities, cfg.seed, cfg.cache_dir or None, not cfg.quiet
        )
    classes, name, fingerprint = data.classes, data.name, data_fingerprint(data)
    return TrainingData(train_images, train_labels, eval_sets, mean, std, classes, name, fingerprint, versions)


def data_fingerprint(data: ImageSet) -> str:
    """The SHA-256 of a data set's training and test images and labels (their shapes, types and
    bytes): equal only for the same images with the same labels in the same order, wherever the
    files lie. Well under a second for CIFAR-10's 180 MB."""
    digest = hashlib.sha256()
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()


def refuse_another_recipe(saved: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume with another recipe than the run started with (its config.json edited, or
    train(cfg, resume=True) given another cfg): it would carry on as neither run, without a word.
    Where the data and the teacher lie and how the machine works may change (RESUMABLE_OVERRIDES).
    A field the checkpoint does not record (an option added since it was written) is not compared."""
    started = json.loads(json.dumps(saved.get("config") or {}))
    now = json.loads(json.dumps(cfg.to_dict()))
    allowed = RESUMABLE_OVERRIDES | {"out_dir", "overwrite"}
    changed = sorted(k for k in started.keys() & now.keys() if k not in allowed and started[k] != now[k])
    if changed:
        what = ", ".join(f"{k} {started[k]!r} -> {now[k]!r}" for k in changed)
        raise MiniResNetError(
            f"the run in {out} started with another recipe ({what}): resume it as it started, or start a new run"
        )


def how_the_work_changed(out: Path, precision: str, processes: int) -> str | None:
    """A note when a resumed run computes in another precision (`auto` on another machine, or
    --device changed) or with another number of processes (BatchNorm's batches) than it started
    with, as its config.json records: it goes on, but not as the unbroken run would have."""
    try:
        started = json.loads((out / "config.json").read_text(encoding="utf-8"))["resolved"]
        before = (started["precision"], started["processes"])
    except (OSError, ValueError, KeyError, TypeError):  # no record to compare with: nothing to say
        return None
    if before == (precision, processes):
        return None
    return (
        f"note: the run in {out} started in {before[0]} with {before[1]} process(es) and continues in {precision} "
        f"with {processes}: it will not end exactly where an unbroken run would have"
    )


def check_resumed_data(saved: dict, data: TrainingData, cfg: TrainConfig, out: Path) -> str | None:
    """Refuse to resume on other data than the checkpoint was trained on: other classes end in a
    shape mismatch (or, as many of them, train on with outputs that now mean other things), and
    another mean and std or other images would carry on silently. One error line names the first fact that
    differs. A checkpoint from before data fingerprints is compared on classes, image size, mean
    and std only: the note returned then says so (None otherwise)."""
    saved_fingerprint = saved.get("data_fingerprint")  # absent in checkpoints written before it existed
    saved_size, size = saved.get("image_size", 32), data.train_images.shape[-1]
    facts = [  # (as trained, as given now) in words, the most telling first
        (f"classes {listed(saved['classes'])}", f"classes {listed(data.classes)}"),
        (f"{saved_size}x{saved_size} images", f"{size}x{size} images"),
        (
            f"mean {listed(saved['mean'], digits=4)} and std {listed(saved['std'], digits=4)}",
            f"mean {listed(data.mean.tolist(), digits=4)} and std {listed(data.std.tolist(), digits=4)}",
        ),
    ]
    if saved_fingerprint is not None:
        facts.append(
            (f"images and labels of SHA-256 {saved_fingerprint}", f"images and labels of SHA-256 {data.fingerprint}")
        )
    trained_on, given = data_source(saved["config"]), data_source(cfg.to_dict())
    for then, now in facts:
        if then != now:
            raise MiniResNetError(
                f"the run in {out} was trained on {trained_on} with {then}; {given} gives {now}: "
                "resume with the same data, or start a new run"
            )
    if saved_fingerprint is None:
        return (
            f"{out / 'last.pt'} predates data fingerprints: {given} has its classes, image size, mean and std, "
            "but whether its image files are the ones trained on could not be compared"
        )
    return None


def data_source(config: dict) -> str:
    """Where a run's data comes from, in words: the data set and the directory (or folder) named."""
    dataset = config.get("dataset", "cifar10")  # configs from before CIFAR-100 and image folders lack these
    if dataset == "folder":
        return f"image folder {config.get('train_folder') or Path(config['data_dir']) / 'train'}"
    return f"{dataset} in {config['data_dir']}"


def listed(values: list | tuple, digits: int | None = None) -> str:
    """A list for a message, its numbers rounded to `digits`; a long one is cut after 10 items."""
    shown = [str(v if digits is None else round(v, digits)) for v in values]
    return f"[{', '.join(shown[:10])}" + (f", ... ({len(shown)} in all)]" if len(shown) > 10 else "]")


def wrap_for_training(model: torch.nn.Module, compile: bool, ddp: Distributed, device: torch.device) -> torch.nn.Module:
    """What the training steps run: the model, wrapped in DistributedDataParallel under torchrun
    and compiled with --compile. The wrappers share the model's weights, so checkpoints and
    evaluation use the plain model."""
    if ddp.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def graph_step_for(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Lookahead,
    loss_fn: TrainingLoss,
    precision: Precision,
    ddp: Distributed,
    device: torch.device,
    say: Callable[[str], None],
) -> GraphStep | None:
    """On a GPU, the training step recorded as a CUDA graph (step.GraphStep), unless --no-cuda-graph
    or something it cannot record is on (said once); None on a CPU, where each kernel's launch is
    cheap beside its work."""
    if device.type != "cuda" or not cfg.cuda_graph:
        return None
    blockers = {
        "torchrun": ddp.enabled,
        "--compile": cfg.compile,
        "--lookahead": bool(cfg.lookahead),
        "fp16 (its loss scaler reads the gradients every step)": precision.name == "fp16",
    }
    if any(blockers.values()):
        reasons = ", ".join(name for name, on in blockers.items() if on)
        say(f"the training step is not recorded as a CUDA graph with {reasons}: each kernel is launched from Python")
        return None
    full = cfg.batch_size
    torch.backends.cudnn.benchmark = True  # one batch shape per image size: cuDNN times its kernels once
    say(
        f"the training step is recorded as a CUDA graph for batches of {full} (an epoch's last, smaller batch "
        "runs eagerly)"
    )
    return GraphStep(model, optimizer, precision=precision, loss_fn=loss_fn, batch_size=full, capture=True)


def training_loss(
    cfg: TrainConfig,
    data: TrainingData,
    device: torch.device,
    precision: Precision,
    memory_format: torch.memory_format,
    resuming: bool = False,
) -> tuple[TrainingLoss, dict | None]:
    """The loss the steps minimise (label smoothing, and with --teacher knowledge distillation) and
    what the run records about its teacher (None without one), which is placed as the model is."""
    if not cfg.teacher:
        return TrainingLoss(cfg.label_smoothing), None
    size = data.train_images.shape[-1]
    try:
        teacher, record = load_teacher(cfg.teacher, data.classes, size, data.mean, data.std)
    except MiniResNetError as e:
        moved = "; if it has moved, give its new place with --teacher" if resuming else ""
        raise MiniResNetError(f"the teacher this run learns from: {e}{moved}") from None
    teacher = model_in_precision(teacher, precision, device, memory_format)
    return TrainingLoss(cfg.label_smoothing, teacher, cfg.distill_weight, cfg.distill_temperature), record


def teacher_line(cfg: TrainConfig, record: dict) -> str:
    """The log line that names the teacher, and what it sees during progressive resizing."""
    members = record.get("members", [record])
    named = " and ".join(
        f"{m['model']} (sha256 {m['sha256'][:12]}..., MiniResNet{tuple(m['arch']['widths'])})" for m in members
    )
    teacher = f"the mean logits of the teachers {named}" if len(members) > 1 else f"the teacher {named}"
    line = f"learning from {teacher} as well as the labels; train_loss is the weighted sum"
    if cfg.downscale_epochs:
        size = cfg.downscale_size
        line += f"; in the first {cfg.downscale_epochs} epochs it sees the same {size}x{size} images as the model"
    if cfg.teacher_sees_original:
        line += "; where the model sees a JPEG-compressed image, the teacher sees the original"
    return line


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The lr of optimizer step `step` (counted from 0 over the whole run).

    step: the seed's StepLR, constant within an epoch. linear: from lr/warmup_steps up to lr over
    the warm-up, then down in a straight line to reach zero at the last step.
    """
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_step_factor ** (step // steps_per_epoch // cfg.lr_step_epochs)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * (total - step) / (total - warmup)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | Lookahead:
    """Adam (the seed's), Nesterov SGD, or Muon for the convolution filters beside Nesterov SGD for
    the rest, wrapped in Lookahead when `lookahead` is set. With `decay_norm_and_bias` off, the 1-D
    parameters (BatchNorm scales and shifts, the fc bias) get no weight decay: shrinking them only
    fights BN. Muon's filters need none (their norm is held fixed)."""
    filters = [p for p in model.parameters() if cfg.optimizer == "muon" and p.ndim == 4]
    others = [p for p in model.parameters() if not any(p is f for f in filters)]
    decay = [p for p in others if cfg.decay_norm_and_bias or p.ndim > 1]
    no_decay = [p for p in others if not (cfg.decay_norm_and_bias or p.ndim > 1)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "muon":
        groups.append({"params": filters, "orthogonal": True, "lr_ratio": cfg.muon_lr / cfg.lr})
    if cfg.init:  # fine-tuning: the layers taken from the initial model are the `body`, the last layer is not
        head = {id(p) for p in model.fc.parameters()}
        groups = [
            {**g, "params": [p for p in g["params"] if (id(p) in head) != body], "body": body}
            for g in groups
            for body in (True, False)
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "muon":
        optimizer = MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # fused: one kernel updates every tensor (the same update, fewer kernel launches).
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)
    else:
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, fused=True)
    return Lookahead(optimizer, cfg.lookahead) if cfg.lookahead else optimizer


def load_initial_weights(model: MiniResNet, cfg: TrainConfig, classes: tuple[str, ...]) -> dict:
    """Put --init's weights into `model` (built for this run's data): every layer, except the last
    when the classes differ (it keeps its fresh initialisation, sized to these classes). The model
    must be of the same architecture and image size. Returns what the run records about it."""
    from .checkpoint import model_file_sha256, model_from_checkpoint, read_model

    state = read_model(cfg.init)
    initial = model_from_checkpoint(state, cfg.init)  # the file's own checks: one error line for anything malformed
    if (initial.widths, initial.blocks_per_stage) != (tuple(cfg.widths), cfg.blocks_per_stage):
        raise MiniResNetError(
            f"--init {cfg.init} is a MiniResNet{initial.widths} with {initial.blocks_per_stage} blocks per stage; "
            f"this run builds MiniResNet{tuple(cfg.widths)} with {cfg.blocks_per_stage}: give --widths and "
            "--blocks-per-stage to match it, or another model"
        )
    size = int(state.get("image_size", 32))
    if size != cfg.image_size:
        raise MiniResNetError(
            f"--init {cfg.init} was trained on {size}x{size} images and this run prepares {cfg.image_size}x"
            f"{cfg.image_size}: give --image-size {size} (the filters are tuned to that scale)"
        )
    weights = initial.state_dict()
    same_classes = list(state["classes"]) == list(classes)
    if not same_classes:
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    model.load_state_dict(weights, strict=same_classes)
    return {
        "model": cfg.init,
        "sha256": model_file_sha256(cfg.init),
        "classes": list(state["classes"]),
        "kept_last_layer": same_classes,
    }


def restore_progress(state: dict, ddp: Distributed) -> Progress:
    """The Progress a checkpoint recorded. Its tally sums every process's share; process 0 carries
    the sums on, the others only the step."""
    tally = EpochTally(**state["tally"]) if ddp.is_main else EpochTally(step=state["tally"]["step"])
    return Progress(state["history"], tally, state["best_val"], state["seconds"], state.get("temperature", 1.0))


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    lr_at_step: Callable[[int], float],
    epoch: int,
    tally: EpochTally | None = None,
    *,
    precision: Precision,
    loss_fn: TrainingLoss = TrainingLoss(),
    ema: EMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ddp: Distributed = Distributed(),
    progress_bar: str | None = None,
    body_lr_scale: float = 1.0,
    frozen_norm: bool = False,
    graph_step: GraphStep | None = None,
) -> Iterator[EpochTally]:
    """One pass over the shuffled, augmented training set from batch `tally.step` on: sets the lr,
    takes an optimizer step and yields the updated tally after each batch, so that the caller
    decides about checkpoints and stopping between steps. Nothing is read back from the device
    between reads of the tally (see EpochTally), so a GPU never waits for the host. A non-finite
    loss raises NonFiniteLoss at the next read, before any checkpoint holds its weights. With fp16,
    `scaler` scales the loss so that small gradients do not underflow. Fine-tuning: the parameter
    groups marked `body` (taken from --init) step at `body_lr_scale` times the lr (0: frozen), and
    with `frozen_norm` BatchNorm uses and keeps its running statistics. With a `graph_step` (a GPU),
    forward, backward and the optimizer run as its recorded CUDA graph, the lr in device tensors."""
    tally = tally or EpochTally()
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    model.train()
    if frozen_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    bar = tqdm(
        loader.batches(tally.step),
        desc=progress_bar,
        unit="batch",
        initial=tally.step,
        total=len(loader),
        leave=False,
        disable=progress_bar is None,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    start, seen_before = time.perf_counter(), tally.seen
    for x, y, *originals in bar:  # originals: what a teacher sees instead of x (--teacher-sees-original)
        lr = lr_at_step(epoch * len(loader) + tally.step)
        if graph_step:
            graph_step.set_lr(lr, body_lr_scale)
            loss, logits = graph_step(x, y, *originals)  # no originals: no third static input to copy
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr * body_lr_scale if group.get("body") else lr
            with autocast(x.device, precision):
                logits = model(x)
                loss = loss_fn(logits, originals[0] if originals else x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # with fp16: skipped when a gradient overflowed; else optimizer.step()
            scaler.update()
        if ema:
            ema.update()
        tally.add(loss, logits, y)
        if read_due(tally.step, len(loader)):
            tally.read(ddp)
            if progress_bar is not None:
                rate = (tally.seen - seen_before) / (time.perf_counter() - start)
                bar.set_postfix(
                    loss=f"{tally.loss_sum / tally.seen:.3f}",
                    acc=f"{tally.correct / tally.seen:.3f}",
                    img_s=f"{rate:.0f}",
                )
        yield tally


def read_due(step: int, steps: int) -> bool:
    """Whether the tally is read after step `step` (counted from 1) of an epoch of `steps`."""
    return step % READ_EVERY == 0 or step == steps


def agreed_stop(signals: StopSignals, ddp: Distributed, due: bool = True) -> int | None:
    """The signal that asks this run to stop, if any process received one: all processes agree,
    so they all stop after the same step. One process looks after every step; several agree only
    when `due` (at the tally's reads), since agreeing is a collective (a wait on a GPU)."""
    if ddp.enabled and not due:
        return None
    return int(ddp.max(signals.received or 0)) or None


def evaluate_sets(
    model: torch.nn.Module, data: TrainingData, ttas: tuple[str, ...], ddp: Distributed, **options
) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor, dict]:
    """Evaluates every set with each TTA mode. Returns the scores ({test,val}_{acc,loss}, with a
    _tta suffix for the augmented evaluation), each set's logits without TTA, and the test set's
    logits and metrics of the last mode."""
    scores, plain_logits, test_logits, test_result = {}, {}, None, None
    for name, (images, labels) in data.eval_sets.items():
        share = images[ddp.shard(len(images))]  # each process one contiguous shard; gathered in order
        for tta in ttas:
            # A set smaller than the processes leaves some with no share: their part of the gather is empty.
            mine = torch.empty(0, len(data.classes), dtype=torch.float32)
            if len(share):
                mine = predict_logits(model, share, data.mean, data.std, tta=tta, **options)
            logits = ddp.gather(mine)
            result = metrics(logits, labels, data.classes)
            suffix = "" if tta == "none" else "_tta"
            scores[f"{name}_loss{suffix}"], scores[f"{name}_acc{suffix}"] = result["loss"], result["accuracy"]
            if tta == "none":
                plain_logits[name] = logits
            if name == "test":
                test_logits, test_result = logits, {**result, "tta": tta}
    return scores, plain_logits, test_logits, test_result


def fitted_temperature(plain_logits: dict[str, torch.Tensor], data: TrainingData) -> float:
    """The temperature that calibrates the model's probabilities, fitted on the validation split's
    logits (never the test set's); 1.0, the plain softmax, when the run holds out no validation split
    or the split gives no temperature to fit (see fit_temperature)."""
    if "val" not in plain_logits:
        return 1.0
    fitted = fit_temperature(plain_logits["val"], data.eval_sets["val"][1])
    return 1.0 if fitted is None else fitted


def calibration_record(test_logits: torch.Tensor, test_labels: torch.Tensor, temperature: float) -> dict:
    """The final epoch's calibration figures: the temperature, and the test set's expected
    calibration error (plain predictions) before and after it."""
    return {
        "temperature": temperature,
        "test_ece": calibration_error(test_logits, test_labels),
        "test_ece_calibrated": calibration_error(test_logits, test_labels, temperature),
    }


def calibration_line(record: dict, calibrated: bool) -> str:
    if not calibrated:
        return f"probabilities not calibrated (no --val-split to fit a temperature): test ECE {record['test_ece']:.2%}"
    if record["temperature"] == 1.0:  # a fitted temperature is never exactly 1
        return (
            "probabilities not calibrated: the validation split gives no temperature to fit (every image right, "
            f"or no signal in the logits), so they stay the plain softmax: test ECE {record['test_ece']:.2%}"
        )
    return (
        f"probabilities calibrated: temperature {record['temperature']:.3f}, fitted on the validation split; "
        f"test ECE {record['test_ece']:.2%} before, {record['test_ece_calibrated']:.2%} after"
    )


def epoch_line(record: dict, epochs: int) -> str:
    evaluated = "".join(f"  {k} {v:.4f}" for k, v in record.items() if "_acc" in k and k != "train_acc")
    return (
        f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.2e}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.4f}{evaluated}  {record['seconds']:.1f}s  {record['images_per_sec']:.0f} img/s"
    )


def summarize(
    cfg: TrainConfig,
    progress: Progress,
    precision: Precision,
    device: torch.device,
    params: int,
    out: Path,
    seconds: float,
) -> dict:
    """summary.json: the final epoch's figures (with the preset's TTA when it has one) and the run's facts."""
    record = progress.history[-1]
    headline = "_tta" if cfg.tta != "none" else ""
    validation = {"val_acc": record.get(f"val_acc{headline}"), "val_acc_plain": record.get("val_acc")}
    best = {"best_checkpoint": str(out / "best.pt"), "best_val_acc": progress.best_val}
    return {
        "test_acc": record[f"test_acc{headline}"],
        "test_acc_plain": record["test_acc"],
        "test_loss": record["test_loss"],
        "tta": cfg.tta,
        **(validation if cfg.val_split else {}),
        # Probabilities: softmax(logits / temperature), the temperature fitted on the validation split.
        "temperature": progress.temperature,
        "test_ece": record.get("test_ece"),
        "test_ece_calibrated": record.get("test_ece_calibrated"),
        "epochs": cfg.epochs,
        "epoch_equivalents": cfg.epoch_equivalents(),
        "seconds": round(seconds, 2),
        "seed": cfg.seed,
        "precision": precision.name,
        "device": str(device),
        "params": params,
        "run_dir": str(out),
        "checkpoint": str(out / "last.pt"),
        **(best if cfg.val_split else {}),
    }
