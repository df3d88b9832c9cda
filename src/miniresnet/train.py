"""train(config) -> summary: the whole training run, top to bottom.

Load the data once into memory, build the model and optimizer, then for each epoch: one pass of
augmented batches, an evaluation on the test set (and the validation split, if any), one line of
metrics.jsonl and a checkpoint. The summary's accuracy is the final epoch's, never the best one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import channel_stats
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import CLASSES, download_cifar10, find_batches_dir, load_cifar10
from .ema import EMA
from .errors import MiniResNetError
from .evaluate import evaluate
from .loader import BatchLoader
from .model import MiniResNet, count_macs, count_parameters
from .runtime import autocast, autocast_dtype, resolve_device, set_threads


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.Adam(groups, lr=cfg.lr)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out_dir)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise MiniResNetError(f"{out} already holds a run; choose another --out, or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    return out


def train(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    cfg.validate()
    out = prepare_run_dir(cfg)
    device = resolve_device(cfg.device)
    threads = set_threads(cfg.threads)
    dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    data = load_data(cfg)
    cfg.validate(train_size=len(data.train_labels))
    n_train = len(data.train_labels) - cfg.val_split
    train_images, train_labels = data.train_images[:n_train], data.train_labels[:n_train]
    mean, std = channel_stats(train_images)
    train_loader = BatchLoader(
        train_images, train_labels, cfg.batch_size, mean, std, shuffle=True,
        crop_padding=cfg.crop_padding, flip=cfg.flip, seed=cfg.seed, device=device,
        channels_last=cfg.channels_last,
    )  # fmt: skip
    eval_sets = {"test": (data.test_images, data.test_labels)}
    if cfg.val_split:
        eval_sets["val"] = (data.train_images[n_train:], data.train_labels[n_train:])

    model = MiniResNet(cfg.widths, cfg.blocks_per_stage, len(CLASSES), zero_init_residual=cfg.zero_init_residual)
    params, macs = count_parameters(model), count_macs(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    final_model = ema.model if ema else model  # the one evaluated and saved

    resolved = {
        **cfg.to_dict(),
        "resolved": {
            "device": str(device), "threads": threads, "autocast": str(dtype) if dtype else None,
            "train_images": n_train, "val_images": cfg.val_split, "params": params, "macs": macs,
            "mean": mean.tolist(), "std": std.tolist(), "torch": torch.__version__,
        },
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    log(f"MiniResNet{cfg.widths}: {params:,} parameters, {macs / 1e6:.1f}M MACs/image; "
             f"{n_train:,} training images on {device} ({threads} threads, {cfg.precision})")  # fmt: skip

    record: dict = {}
    for epoch in range(cfg.epochs):
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        lr = learning_rate(cfg, epoch * len(train_loader), len(train_loader))
        train_loss, train_acc = train_one_epoch(model, optimizer, train_loader, device, dtype, cfg, epoch, ema)
        train_seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            for name, (images, labels) in eval_sets.items():
                for tta in ("none", cfg.tta) if last and cfg.tta != "none" else ("none",):
                    result = evaluate(final_model, images, labels, mean, std, batch_size=cfg.eval_batch_size,
                                      device=device, dtype=dtype, channels_last=cfg.channels_last, tta=tta)  # fmt: skip
                    suffix = "" if tta == "none" else "_tta"
                    record[f"{name}_loss{suffix}"], record[f"{name}_acc{suffix}"] = result["loss"], result["accuracy"]
        record["seconds"] = time.perf_counter() - epoch_start
        record["elapsed"] = time.perf_counter() - started
        record["images_per_sec"] = n_train / train_seconds
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(
            {"arch": model.arch(), "model": final_model.state_dict(), "classes": list(CLASSES),
             "mean": mean.tolist(), "std": std.tolist(), "config": cfg.to_dict(), "epoch": epoch + 1,
             "optimizer": optimizer.state_dict(), "trained_model": model.state_dict() if ema else None,
             "ema": ema.state_dict() if ema else None},
            out / "last.pt",
        )  # fmt: skip
        evaluated = "".join(f"  {k} {v:.4f}" for k, v in record.items() if "_acc" in k and k != "train_acc")
        log(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.2e}  train loss {train_loss:.4f} acc {train_acc:.4f}"
            f"{evaluated}  {record['seconds']:.1f}s  {record['images_per_sec']:.0f} img/s")  # fmt: skip

    headline = "_tta" if cfg.tta != "none" else ""
    summary = {
        "test_acc": record[f"test_acc{headline}"],
        "test_acc_plain": record["test_acc"],
        "test_loss": record["test_loss"],
        "tta": cfg.tta,
        **({"val_acc": record[f"val_acc{headline}"], "val_acc_plain": record["val_acc"]} if cfg.val_split else {}),
        "epochs": cfg.epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "device": str(device),
        "params": params,
        "run_dir": str(out),
        "checkpoint": str(out / "last.pt"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_one_epoch(
    model, optimizer, loader, device, dtype, cfg: TrainConfig, epoch: int, ema: EMA | None = None
) -> tuple[float, float]:
    """One pass over the shuffled, augmented training set, setting the lr before every step;
    returns mean loss and accuracy."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               disable=cfg.quiet, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar):
        lr = learning_rate(cfg, epoch * len(loader) + step, len(loader))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            ema.update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % 20 == 0 and not cfg.quiet:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        raise MiniResNetError(
            f"the training loss became {mean_loss} in epoch {epoch + 1}; lower --lr or use --precision fp32"
        )
    return mean_loss, correct.item() / seen


def log(message: str) -> None:
    """Progress for people goes to stderr, so stdout stays clean for the JSON summary."""
    print(message, file=sys.stderr, flush=True)
