"""Throughput of the real training and evaluation loops, beside the machine's own matmul
roofline measured in the same run, so that speed is reported as a fraction of what the
hardware can do and not only as a number of images per second."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import torch

from .config import PRESETS, TrainConfig
from .distributed import Distributed
from .evaluate import evaluate
from .loader import BatchLoader
from .loss import TrainingLoss
from .model import MiniResNet, count_macs
from .runtime import Precision, describe_machine, model_in_precision, resolve_device, resolve_precision
from .train import build_optimizer, graph_step_for, learning_rate, train_steps

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
MEAN, STD = torch.full((3,), 0.5), torch.full((3,), 0.25)  # any normalisation costs the same


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of a size^3 matrix product: the practical peak for dense work here."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def synthetic_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def _model(cfg: TrainConfig, device: torch.device, precision: Precision) -> MiniResNet:
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model_in_precision(MiniResNet(cfg.widths, cfg.blocks_per_stage), precision, device, memory_format)


class StepTimer:
    """The loop `miniresnet train` runs (`train_steps`: batched crop/flip, normalisation, forward,
    backward, the preset's optimizer and lr schedule) on a model of its own: each call trains
    `steps` batches of synthetic images, one more epoch, and returns its images/s. On a GPU the step
    is a recorded CUDA graph where training would record one (train.graph_step_for)."""

    def __init__(self, cfg: TrainConfig, steps: int, device: torch.device) -> None:
        images, labels = synthetic_data(cfg.batch_size * steps)
        options = dict(shuffle=True, crop_padding=cfg.crop_padding, flip=cfg.flip, channels_last=cfg.channels_last)
        self.precision = resolve_precision(cfg.precision, device)
        options |= dict(device=device, dtype=self.precision.weights)
        self.loader = BatchLoader(images, labels, cfg.batch_size, MEAN, STD, **options)
        self.model = _model(cfg, device, self.precision)
        self.optimizer = build_optimizer(self.model, cfg)
        self.model_to_train = torch.compile(self.model) if cfg.compile else self.model  # compiled on the first call
        self.lr_at_step = functools.partial(learning_rate, cfg, steps_per_epoch=len(self.loader))
        self.loss_fn, self.device, self.epoch = TrainingLoss(cfg.label_smoothing), device, 0
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.name == "fp16")
        self.graph_step = graph_step_for(
            cfg,
            self.model_to_train,
            self.optimizer,
            self.loss_fn,
            self.precision,
            Distributed(),
            device,
            say=lambda _: None,
        )

    def __call__(self) -> float:
        self.loader.set_epoch(self.epoch)
        synchronize(self.device)
        start = time.perf_counter()
        steps = train_steps(
            self.model_to_train,
            self.optimizer,
            self.loader,
            self.lr_at_step,
            self.epoch,
            precision=self.precision,
            loss_fn=self.loss_fn,
            scaler=self.scaler,
            graph_step=self.graph_step,
        )
        for _ in steps:
            pass
        synchronize(self.device)
        self.epoch += 1
        return len(self.loader.labels) / (time.perf_counter() - start)

    def rates(self, repeats: int) -> list[float]:
        """Images/s of `repeats` calls after one warm-up (which also records a GPU's graph)."""
        self()
        return [self() for _ in range(repeats)]


def time_training(cfg: TrainConfig, steps: int, repeats: int, device: torch.device) -> list[float]:
    """Images/s of the training loop (see StepTimer) over `steps` batches, once per repeat after a warm-up."""
    return StepTimer(cfg, steps, device).rates(repeats)


def time_evaluation(cfg: TrainConfig, repeats: int, device: torch.device) -> list[float]:
    """Images/s of `evaluate` over 10,000 images, the size of the CIFAR-10 test set."""
    images, labels = synthetic_data(TEST_IMAGES, seed=1)
    precision = resolve_precision(cfg.precision, device)
    model = _model(cfg, device, precision)
    rates = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        evaluate(
            model,
            images,
            labels,
            MEAN,
            STD,
            batch_size=cfg.eval_batch_size,
            device=device,
            precision=precision,
            channels_last=cfg.channels_last,
        )
        synchronize(device)
        if repeat:
            rates.append(TEST_IMAGES / (time.perf_counter() - start))
    return rates


def run_bench(
    precision: str = "fp32",
    batch_size: int = 100,
    steps: int = 30,
    repeats: int = 5,
    device: str = "auto",
    preset: str = "seed",
    compile: bool = False,
    cuda_graph: bool = True,
) -> dict:
    """One precision's figures; the train FLOPs per image count the backward pass as twice the forward."""
    dev = resolve_device(device)
    resolved = resolve_precision(precision, dev)  # a fallback is said once, here; the timed loops get what ran
    dtype = resolved.autocast or resolved.weights  # the roofline is a matmul in the dtype the convolutions run in
    cfg = dataclasses.replace(
        PRESETS[preset],
        precision=resolved.name,
        batch_size=batch_size,
        quiet=True,
        compile=compile,
        cuda_graph=cuda_graph,
    )
    macs = count_macs(MiniResNet(cfg.widths, cfg.blocks_per_stage))
    roofline = matmul_gflops(dev, dtype)
    timer = StepTimer(cfg, steps, dev)
    train_rate = statistics.median(timer.rates(repeats))
    eval_rate = statistics.median(time_evaluation(cfg, repeats, dev))
    train_flop = 3 * 2 * macs
    return {
        "precision": resolved.name,
        "asked_precision": precision,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "device": str(dev),
        "machine": describe_machine(dev),
        "batch_size": batch_size,
        "preset": preset,
        "compile": compile,
        "cuda_graph": timer.graph_step is not None,
        "train_images_per_sec": round(train_rate, 1),
        "eval_images_per_sec": round(eval_rate, 1),
        "matmul_gflops": round(roofline, 1),
        "train_gflops": round(train_rate * train_flop / 1e9, 1),
        "efficiency": round(train_rate * train_flop / 1e9 / roofline, 3),
        "epoch_seconds": round(TRAIN_IMAGES / train_rate + TEST_IMAGES / eval_rate, 1),
        "test_eval_seconds": round(TEST_IMAGES / eval_rate, 2),
        "repeats": repeats,
        "steps": steps,
    }
