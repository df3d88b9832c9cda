"""One dataclass holds every knob of a run; a preset is a named instance of it, nothing more.
The CLI is generated from these fields, so each option maps onto exactly one field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # The recipe. Defaults are the seed spec: Adam 1e-3, batch 100, 25 epochs, lr x0.5 every 20.
    epochs: int = _opt(25, "passes over the training set")
    batch_size: int = _opt(100, "images per optimizer step")
    lr: float = _opt(1e-3, "Adam learning rate at the start")
    weight_decay: float = _opt(0.0, "L2 penalty added by Adam (the seed recipe uses none)")
    lr_step_epochs: int = _opt(20, "multiply the learning rate by --lr-step-factor every this many epochs")
    lr_step_factor: float = _opt(0.5, "the factor applied every --lr-step-epochs")
    crop_padding: int = _opt(4, "random-crop augmentation: zero padding on each side (0 = no crop)")
    flip: bool = _opt(True, "random horizontal flip augmentation")
    # The model: the seed spec's widths and depth.
    widths: tuple[int, ...] = _opt((16, 32, 64), "channels of each stage", nargs="+")
    blocks_per_stage: int = _opt(2, "residual blocks in each stage")
    # Data and protocol.
    data_dir: str = _opt("data", "directory holding cifar-10-batches-bin/ (or -py/)")
    download: bool = _opt(True, "download CIFAR-10 into --data-dir when it is not there")
    verify_data: bool = _opt(True, "check every data file against its published MD5 before use")
    val_split: int = _opt(0, "hold out the last N training images as a validation set (0 = off)")
    seed: int = _opt(0, "seed for weights, data order and augmentation")
    # Machinery: where and how it runs; none of this changes what the recipe computes.
    device: str = _opt("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = _opt("fp32", "fp32, bf16 (autocast) or fp16 (CUDA only)", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and GPU)")
    threads: int = _opt(0, "CPU threads for PyTorch (0 = the cores this process may use)")
    eval_batch_size: int = _opt(100, "images per batch when evaluating (small batches stay in cache: faster on CPU)")
    out_dir: str = _opt("runs/latest", "run directory: config.json, metrics.jsonl, checkpoints")
    overwrite: bool = _opt(False, "replace a run already in --out")
    quiet: bool = _opt(False, "no progress bars: one log line per epoch")

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)

    def validate(self, train_size: int | None = None) -> None:
        """Refuse values that cannot work, with the reason, before any work is done."""
        problems = []
        for name in ("epochs", "batch_size", "lr_step_epochs", "blocks_per_stage", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("crop_padding", "val_split", "threads", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not self.widths or min(self.widths) < 1:
            problems.append(f"widths must be positive, got {self.widths}")
        if train_size is not None:
            if self.val_split >= train_size:
                problems.append(f"val_split {self.val_split} leaves no training images (of {train_size})")
            elif self.batch_size > train_size - self.val_split:
                problems.append(
                    f"batch_size {self.batch_size} is larger than the {train_size - self.val_split} training images"
                )
        if problems:
            from .errors import MiniResNetError

            raise MiniResNetError("invalid configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # The seed recipe exactly as written in SEED.md.
    "seed": TrainConfig(),
}
