"""train(config) -> summary: the whole training run, top to bottom.

Load the data once into memory, build the model and optimizer, then for each epoch: one pass of
augmented batches, an evaluation on the test set (and the validation split, if any), one line of
metrics.jsonl and a checkpoint. The summary's accuracy is the final epoch's, never the best one.

A run can stop and carry on: `last.pt` holds everything the next step depends on (weights,
optimizer, EMA, where in which epoch, the epoch's running sums, the metrics so far), the data
order comes from (seed, epoch) alone, so `train(cfg, resume=True)` continues exactly where the
checkpoint left off. SIGINT and SIGTERM finish the current step, save, and stop.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import channel_stats
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import CLASSES, download_cifar10, find_batches_dir, load_cifar10
from .distributed import Distributed, init_distributed, shutdown_distributed, sync_batchnorm
from .ema import EMA
from .errors import MiniResNetError
from .evaluate import metrics, predict_logits
from .loader import BatchLoader
from .model import MiniResNet, count_macs, count_parameters
from .plots import NO_MATPLOTLIB, have_matplotlib, plot_curves, plot_evaluation
from .runtime import (
    Precision,
    autocast,
    available_cores,
    describe_machine,
    resolve_device,
    resolve_precision,
    set_threads,
)


class TrainingInterrupted(MiniResNetError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved. Exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class EpochTally:
    """The current epoch's progress and running sums; mid-epoch checkpoints carry it, so a resumed
    epoch starts at the right batch and reports the same loss and accuracy as an unbroken one."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


def load_data(cfg: TrainConfig):
    """The data set, downloading it first when it is missing and downloads are allowed."""
    try:
        find_batches_dir(Path(cfg.data_dir))
    except MiniResNetError:
        if not cfg.download:
            raise
        download_cifar10(cfg.data_dir, progress=not cfg.quiet)
    return load_cifar10(cfg.data_dir, verify=cfg.verify_data)


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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the seed's) or Nesterov SGD; with `decay_norm_and_bias` off, the 1-D parameters
    (BatchNorm scales and shifts, the fc bias) get no weight decay: shrinking them only fights BN."""
    decay = [p for p in model.parameters() if cfg.decay_norm_and_bias or p.ndim > 1]
    no_decay = [p for p in model.parameters() if not (cfg.decay_norm_and_bias or p.ndim > 1)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel updates every tensor (the same update; ~2% of a CPU step saved).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)
    return torch.optim.Adam(groups, lr=cfg.lr, fused=True)


def open_run_dir(cfg: TrainConfig, resume: bool, is_main: bool = True) -> dict | None:
    """A fresh run refuses a directory holding another run (unless `overwrite`); a resumed one
    needs its checkpoint, which is returned. Only the main process changes files."""
    out = Path(cfg.out_dir)
    if resume:
        if not (out / "last.pt").is_file():
            raise MiniResNetError(f"there is no run to resume in {out}: {out / 'last.pt'} does not exist")
        for leftover in out.glob(".*.tmp") if is_main else ():  # from a save cut off by a kill
            leftover.unlink(missing_ok=True)
        state = load_checkpoint(out / "last.pt")
        if state.get("epoch") == cfg.epochs and (out / "summary.json").exists():  # written last of all
            raise MiniResNetError(f"the run in {out} has already finished all {cfg.epochs} epochs (see summary.json)")
        return state
    if (out / "config.json").exists() and not cfg.overwrite:
        raise MiniResNetError(
            f"{out} already holds a run; choose another --out, pass --resume {out} to continue it, "
            "or --overwrite to replace it"
        )
    if not is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "last.pt", "best.pt", "summary.json", "test_eval.json", "report.html",
                  "curves.png", "confusion.png", "misclassified.png"):  # fmt: skip
        (out / stale).unlink(missing_ok=True)
    return None


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StopSignals:
    """While active, SIGINT and SIGTERM only raise a flag that the loop checks between steps, so
    the weights are never saved half-updated. A second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with `resume`, continue) the training `cfg` describes; returns the summary.
    Under torchrun, every process calls this and they share the work (see distributed.py)."""
    cfg.validate()
    ddp, device = init_distributed(resolve_device(cfg.device))
    try:
        summary = _train(cfg, resume, ddp, device)
        ddp.barrier()  # process 0 writes the plots and summary last; the others wait, then all leave together
        return summary
    finally:
        if ddp.enabled:
            shutdown_distributed()


def _train(cfg: TrainConfig, resume: bool, ddp: Distributed, device: torch.device) -> dict:
    started = time.perf_counter()
    say = log if ddp.is_main else lambda _message: None
    if cfg.batch_size % ddp.world_size:
        raise MiniResNetError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                              f"{ddp.world_size} processes")  # fmt: skip
    state = open_run_dir(cfg, resume, ddp.is_main)
    out = Path(cfg.out_dir)
    threads = set_threads(cfg.threads or max(1, available_cores() // ddp.local_world_size))
    precision = resolve_precision(cfg.precision, device)  # what runs, which `auto` or a fallback decides
    torch.manual_seed(cfg.seed)

    data = load_data(cfg)
    cfg.validate(train_size=len(data.train_labels))
    n_train = len(data.train_labels) - cfg.val_split
    train_images, train_labels = data.train_images[:n_train], data.train_labels[:n_train]
    mean, std = channel_stats(train_images)
    train_loader = BatchLoader(
        train_images, train_labels, cfg.batch_size, mean, std, shuffle=True,
        crop_padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout, seed=cfg.seed, device=device,
        channels_last=cfg.channels_last, dtype=precision.weights, rank=ddp.rank, world_size=ddp.world_size,
    )  # fmt: skip
    eval_sets = {"test": (data.test_images, data.test_labels)}
    if cfg.val_split:
        eval_sets["val"] = (data.train_images[n_train:], data.train_labels[n_train:])

    model = MiniResNet(cfg.widths, cfg.blocks_per_stage, len(CLASSES), zero_init_residual=cfg.zero_init_residual)
    params, macs = count_parameters(model), count_macs(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, precision.weights, memory_format=memory_format)
    if cfg.sync_bn and ddp.enabled:
        model = sync_batchnorm(model)
    trainee = model  # what the steps run: the model itself, or its DistributedDataParallel wrapper
    if ddp.enabled:
        trainee = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the weights stay the model's own: checkpoints and evaluation use the plain module
        trainee = torch.compile(trainee)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    final_model = ema.model if ema else model  # the one evaluated and saved

    history: list[dict] = []  # one metrics record per finished epoch
    tally = EpochTally()
    best_val = -1.0
    earlier_seconds = 0.0  # spent by the process(es) before a resume
    if state:
        model.load_state_dict(state["trained_model"] if ema else state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        history, best_val, earlier_seconds = state["history"], state["best_val"], state["seconds"]
        # The checkpoint's tally sums every process's share; process 0 carries it on.
        tally = EpochTally(**state["tally"]) if ddp.is_main else EpochTally(step=state["tally"]["step"])
        say(f"resuming {out} after epoch {state['epoch']}" + (f", step {tally.step}" if tally.step else ""))
    elif ddp.is_main:
        resolved = {
            **cfg.to_dict(),
            "resolved": {
                "device": str(device), "threads": threads, "precision": precision.name,
                "machine": describe_machine(device),
                "train_images": n_train, "val_images": cfg.val_split, "params": params, "macs": macs,
                "mean": mean.tolist(), "std": std.tolist(), "torch": torch.__version__,
                "processes": ddp.world_size,
            },
        }  # fmt: skip
        write_text_atomically(out / "config.json", json.dumps(resolved, indent=2) + "\n")
    if ddp.is_main:
        write_text_atomically(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    processes = f" x {ddp.world_size} processes" if ddp.enabled else ""
    say(f"MiniResNet{cfg.widths}: {params:,} parameters, {macs / 1e6:.1f}M MACs/image; "
        f"{n_train:,} training images on {device} ({threads} threads{processes}, {precision.name})")  # fmt: skip

    def elapsed() -> float:
        return earlier_seconds + time.perf_counter() - started

    def save(path: Path, epochs_done: int) -> None:
        """Every process calls this (the epoch's sums are added up across them); process 0 writes."""
        loss_sum, correct, seen = ddp.sum([tally.loss_sum, tally.correct, tally.seen])
        summed = {"step": tally.step, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}
        if ddp.is_main:
            save_checkpoint(
                {"arch": model.arch(), "model": final_model.state_dict(), "classes": list(CLASSES),
                 "mean": mean.tolist(), "std": std.tolist(), "config": cfg.to_dict(), "epoch": epochs_done,
                 "optimizer": optimizer.state_dict(), "trained_model": model.state_dict() if ema else None,
                 "ema": ema.state_dict() if ema else None, "tally": summed, "history": history,
                 "best_val": best_val, "seconds": elapsed(),
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}},
                path,
            )  # fmt: skip
        ddp.barrier()  # nobody moves on (or exits) while process 0 is still writing

    inference = dict(
        batch_size=cfg.eval_batch_size, device=device, precision=precision, channels_last=cfg.channels_last
    )
    final_test: dict = {}  # the last epoch's test logits and metrics, for test_eval.json and the plots
    final_ttas = ("none", cfg.tta) if cfg.tta != "none" else ("none",)  # evaluated after the last epoch

    def evaluate_all(ttas: tuple[str, ...]) -> dict:
        """{test,val}_{acc,loss}, with a _tta suffix for the augmented evaluation."""
        record = {}
        for name, (images, labels) in eval_sets.items():
            for tta in ttas:
                share = ddp.shard(len(images))  # each process one contiguous shard; gathered in order
                logits = ddp.gather(predict_logits(final_model, images[share], mean, std, tta=tta, **inference))
                result = metrics(logits, labels)
                suffix = "" if tta == "none" else "_tta"
                record[f"{name}_loss{suffix}"], record[f"{name}_acc{suffix}"] = result["loss"], result["accuracy"]
                if name == "test":
                    final_test.update(logits=logits, result={**result, "tta": tta})
        return record

    def stop_if_asked(epochs_done: int, save_first: bool) -> None:
        """If any process got SIGINT/SIGTERM (all agree, so all stop at the same step): save, then stop."""
        stop.received = int(ddp.max(stop.received or 0)) or None
        if stop.received is None:
            return
        if save_first:
            save(out / "last.pt", epochs_done)
        where = f"epoch {epochs_done}" + (f" and step {tally.step} of epoch {epochs_done + 1}" if tally.step else "")
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(stop.received).name} after {where}; checkpoint {out / 'last.pt'}. "
            f"Continue with: miniresnet train --resume {out}",
            stop.received,
        )

    def after_step(epoch: int) -> None:
        if cfg.checkpoint_every and tally.step % cfg.checkpoint_every == 0 and tally.step < len(train_loader):
            save(out / "last.pt", epoch)
        stop_if_asked(epoch, save_first=True)

    scalars = tensorboard_writer(out) if cfg.tensorboard and ddp.is_main else None
    with StopSignals() as stop:
        for epoch in range(len(history), cfg.epochs):
            train_loader.set_epoch(epoch)
            train_loader.resize_to = cfg.downscale_size if epoch < cfg.downscale_epochs else None
            epoch_start = time.perf_counter()
            train_loss, train_acc = train_one_epoch(
                trainee, optimizer, train_loader, device, precision, cfg, epoch, ema, tally,
                after_step=functools.partial(after_step, epoch), checkpoint=out / "last.pt", ddp=ddp,
            )  # fmt: skip
            tally = EpochTally()
            train_seconds = time.perf_counter() - epoch_start
            lr = learning_rate(cfg, epoch * len(train_loader), len(train_loader))
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
            last = epoch + 1 == cfg.epochs
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                record |= evaluate_all(final_ttas if last else ("none",))
            record["seconds"] = time.perf_counter() - epoch_start
            record["elapsed"] = elapsed()
            record["images_per_sec"] = n_train / train_seconds
            history.append(record)
            improved = "val_acc" in record and record["val_acc"] > best_val
            best_val = max(best_val, record.get("val_acc", best_val))
            save(out / "last.pt", epoch + 1)
            if improved:
                save(out / "best.pt", epoch + 1)
            if ddp.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if scalars:
                for key, value in record.items():
                    scalars.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                scalars.flush()
            evaluated = "".join(f"  {k} {v:.4f}" for k, v in record.items() if "_acc" in k and k != "train_acc")
            say(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.2e}  train loss {train_loss:.4f} acc {train_acc:.4f}"
                f"{evaluated}  {record['seconds']:.1f}s  {record['images_per_sec']:.0f} img/s")  # fmt: skip
            if not last:
                stop_if_asked(epoch + 1, save_first=False)  # this epoch's checkpoint is saved already

    if scalars:
        scalars.close()
    if not final_test:  # resumed after the last epoch's checkpoint but before its results were written
        evaluate_all(final_ttas)  # the same weights give the same figures, already in `history`
    record = history[-1]
    headline = "_tta" if cfg.tta != "none" else ""
    summary = {
        "test_acc": record[f"test_acc{headline}"],
        "test_acc_plain": record["test_acc"],
        "test_loss": record["test_loss"],
        "tta": cfg.tta,
        **({"val_acc": record[f"val_acc{headline}"], "val_acc_plain": record["val_acc"]} if cfg.val_split else {}),
        "epochs": cfg.epochs,
        "seconds": round(elapsed(), 2),
        "seed": cfg.seed,
        "precision": precision.name,
                "machine": describe_machine(device),
        "device": str(device),
        "params": params,
        "run_dir": str(out),
        "checkpoint": str(out / "last.pt"),
        **({"best_checkpoint": str(out / "best.pt"), "best_val_acc": best_val} if cfg.val_split else {}),
    }
    if ddp.is_main:
        write_text_atomically(out / "test_eval.json", json.dumps(final_test["result"]) + "\n")
        write_plots(out, history, data.test_images, data.test_labels, final_test)
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MiniResNetError(
            "--tensorboard needs the tensorboard package: pip install 'miniresnet[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def write_plots(out: Path, history: list[dict], images: torch.Tensor, labels: torch.Tensor, final_test: dict) -> None:
    """curves.png, confusion.png and misclassified.png in the run directory, when matplotlib is there."""
    if not have_matplotlib():
        log(f"no plots written: {NO_MATPLOTLIB}")
        return
    plot_curves(history, out / "curves.png")
    plot_evaluation(images, labels, final_test["logits"], final_test["result"], CLASSES, out, "test set")


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    device: torch.device,
    precision: Precision,
    cfg: TrainConfig,
    epoch: int,
    ema: EMA | None = None,
    tally: EpochTally | None = None,
    after_step=None,
    checkpoint: Path | None = None,
    ddp: Distributed = Distributed(),
) -> tuple[float, float]:
    """One pass over the shuffled, augmented training set from batch `tally.step` on, setting the
    lr before every step and calling `after_step()` after it; returns mean loss and accuracy.
    A non-finite loss stops the run before the step is taken, so the last checkpoint stays good."""
    tally = tally or EpochTally()
    model.train()
    quiet = cfg.quiet or not ddp.is_main
    bar = tqdm(loader.batches(tally.step), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", initial=tally.step,
               total=len(loader), leave=False, disable=quiet, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    start, seen_before = time.perf_counter(), tally.seen
    for x, y in bar:
        lr = learning_rate(cfg, epoch * len(loader) + tally.step, len(loader))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        value = loss.item()
        if ddp.max(0.0 if math.isfinite(value) else 1.0):  # any process's loss: all stop
            kept = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
            raise MiniResNetError(
                f"the training loss became {value} at step {tally.step + 1} of epoch {epoch + 1} "
                f"(lr {lr:.3g}, {precision.name}){kept}. Lower --lr or add --warmup"
                + (", or use --precision fp32" if precision.autocast else "")
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            ema.update()
        tally.step += 1
        tally.loss_sum += value * len(y)
        tally.correct += int((logits.argmax(1) == y).sum())
        tally.seen += len(y)
        if tally.step % 20 == 0 and not quiet:
            rate = (tally.seen - seen_before) / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.3f}",
                            acc=f"{tally.correct / tally.seen:.3f}", img_s=f"{rate:.0f}")  # fmt: skip
        if after_step:
            after_step()
    loss_sum, correct, seen = ddp.sum([tally.loss_sum, tally.correct, tally.seen])
    return loss_sum / seen, correct / seen


def log(message: str) -> None:
    """Progress for people goes to stderr, so stdout stays clean for the JSON summary."""
    print(message, file=sys.stderr, flush=True)
