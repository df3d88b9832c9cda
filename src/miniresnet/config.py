"""One dataclass holds every knob of a run; a preset is a named instance of it, nothing more.
The CLI is generated from these fields, so each option maps onto exactly one field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .runtime import PRECISIONS

# Test-time augmentation: the views whose logits are averaged (see evaluate.views).
TTA_MODES = ("none", "flip", "flip-translate")


# What may differ when a run is resumed: where the data is and how the work is done, not what is computed.
RESUMABLE_OVERRIDES = {
    "data_dir",
    "teacher",  # where the teacher lies now; a resume checks it is the same model (sha256)
    "train_folder",
    "test_folder",
    "cache_dir",
    "download",
    "verify_data",
    "device",
    "threads",
    "quiet",
    "checkpoint_every",
}


# What each type of field must hold, as the error says it.
TYPE_NAMES = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a finite number",
    "str": "a string",
    "tuple[int, ...]": "a list of whole numbers",
}


def has_type(value, kind: str) -> bool:
    """Whether `value` is of the field type named `kind` (a bool is not a number here)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple"):
        return isinstance(value, tuple | list) and all(has_type(v, "int") for v in value)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, int | float) and math.isfinite(value)


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # The recipe. Defaults are the seed spec: Adam 1e-3, batch 100, 25 epochs, lr x0.5 every 20.
    epochs: int = _opt(25, "passes over the training set")
    batch_size: int = _opt(100, "images per optimizer step")
    optimizer: str = _opt(
        "adam",
        "adam; sgd (with Nesterov momentum); or muon: Muon steps for the convolution filters (see "
        "--muon-lr), Nesterov SGD for the other parameters",
        choices=("adam", "sgd", "muon"),
    )
    lr: float = _opt(1e-3, "peak learning rate")
    momentum: float = _opt(0.9, "SGD's and Muon's Nesterov momentum (Adam keeps its own betas)")
    muon_lr: float = _opt(
        0.05,
        "muon: the convolution filters' peak step, relative to their norm (held fixed: BatchNorm "
        "follows each); the schedule scales it as it scales --lr",
    )
    lookahead: int = _opt(
        0,
        "Lookahead: every N optimizer steps, move a slow copy of the weights halfway to the trained "
        "ones and continue training from it (0 = off)",
    )
    weight_decay: float = _opt(0.0, "L2 penalty added to the gradient (the seed recipe uses none)")
    decay_norm_and_bias: bool = _opt(True, "apply weight decay to BatchNorm scales and shifts and the fc bias too")
    schedule: str = _opt(
        "step",
        "step: x --lr-step-factor every --lr-step-epochs epochs; linear: linear warm-up "
        "over --warmup of the steps, then linear decay to zero, updated every step",
        choices=("step", "linear"),
    )
    lr_step_epochs: int = _opt(20, "step schedule: multiply the lr by --lr-step-factor every this many epochs")
    lr_step_factor: float = _opt(0.5, "step schedule: the factor applied every --lr-step-epochs")
    warmup: float = _opt(0.0, "linear schedule: fraction of all steps spent raising the lr from 0 to --lr")
    label_smoothing: float = _opt(0.0, "cross-entropy against targets mixed with this much of the uniform")
    ema: float = _opt(
        0.0,
        "decay per step of an exponential moving average of the weights, which is then "
        "evaluated and saved in their place (0 = off)",
    )
    zero_init_residual: bool = _opt(
        False, "start each block's last BatchNorm scale at 0: every block begins as the identity"
    )
    stem_init: str = _opt(
        "default",
        "default (PyTorch's), or whitened: the first convolution starts as the principal "
        "directions of the training images' 3x3 patches, each scaled to unit variance, and their "
        "negatives (an initialisation only: the network is unchanged)",
        choices=("default", "whitened"),
    )
    # Fine-tuning: start from a trained model instead of random weights.
    init: str = _opt(
        "",
        "start from a trained model's weights: a shipped name (best, best-jpeg, seed), a checkpoint or a safetensors "
        "export. Its layers are kept; the last is new, sized to this data's classes, unless the classes are "
        "the same in the same order",
    )
    body_lr_ratio: float = _opt(1.0, "with --init: the lr of the layers taken from it, relative to the new last one's")
    freeze_epochs: int = _opt(0, "with --init: for the first N epochs only the last layer trains")
    freeze_norm: bool = _opt(
        False, "with --init: BatchNorm normalises with the initial model's running statistics and keeps them"
    )
    # Knowledge distillation: learn from a trained model's probabilities as well as the labels.
    teacher: str = _opt(
        "",
        "knowledge distillation: also match this trained model's softened probabilities on each "
        "augmented batch (a shipped name, a checkpoint or a safetensors export of the same classes; it may be "
        "wider or deeper); several separated by commas (best,best-jpeg) teach as one, their logits averaged",
    )
    distill_weight: float = _opt(
        0.5, "with --teacher: the weight of the distillation term; the labels' cross-entropy gets the rest"
    )
    distill_temperature: float = _opt(4.0, "with --teacher: the temperature both models' probabilities are softened by")
    teacher_sees_original: bool = _opt(
        False,
        "with --teacher and --jpeg-p: the teacher sees each image as it was before JPEG compression (with the same "
        "crop, flip, cutout and size), so the model learns to answer for a compressed image what the teacher answers "
        "for the original",
    )
    downscale_epochs: int = _opt(
        0,
        "progressive resizing: train the first N epochs on images scaled down to "
        "--downscale-size (cheaper steps; the model is fully convolutional)",
    )
    downscale_size: int = _opt(24, "the image size of the first --downscale-epochs epochs")
    crop_padding: int = _opt(4, "random-crop augmentation: zero padding on each side (0 = no crop)")
    flip: bool = _opt(True, "random horizontal flip augmentation")
    alternate_flip: bool = _opt(
        False,
        "flip: mirror each image in every other epoch (which ones is a fixed coin toss per image) "
        "instead of at random, so each image is seen both ways every two epochs",
    )
    cutout: int = _opt(
        0,
        "cutout augmentation: blank a square this many pixels wide at a random place in each "
        "training image, set before any downscaling (0 = off)",
    )
    jpeg_p: float = _opt(
        0.0,
        "JPEG augmentation: each epoch, each training image is replaced with this probability by one of its "
        "--jpeg-versions JPEG-compressed versions (prepared once, cached)",
    )
    jpeg_versions: int = _opt(4, "JPEG augmentation: compressed versions prepared of each training image")
    jpeg_qualities: tuple[int, ...] = _opt(
        (40, 95), "JPEG augmentation: the lowest and highest quality the versions are drawn from", nargs=2
    )
    tta: str = _opt(
        "none",
        "test-time augmentation of the final evaluation: the mean logits over the image and "
        "its mirror (flip), and also both shifted 2 pixels up-left and down-right (flip-translate)",
        choices=TTA_MODES,
    )
    eval_every: int = _opt(1, "evaluate every N epochs (0 = after the last only; the last is always evaluated)")
    # The model: the seed spec's widths and depth.
    widths: tuple[int, ...] = _opt((16, 32, 64), "channels of each stage", nargs="+")
    blocks_per_stage: int = _opt(2, "residual blocks in each stage")
    # Data and protocol.
    dataset: str = _opt(
        "cifar10",
        "cifar10, cifar100, or folder (your images: --data-dir holding train/<class>/* and test/<class>/*, "
        "or --train-folder)",
        choices=("cifar10", "cifar100", "folder"),
    )
    data_dir: str = _opt(
        "data", "directory holding cifar-10-batches-bin/ (or -py/), cifar-100-python/, or train/ and test/ folders"
    )
    labels: str = _opt("fine", "CIFAR-100: fine (100 classes) or coarse (20 superclasses)", choices=("fine", "coarse"))
    train_folder: str = _opt(
        "", "folder data: the training images, one sub-folder per class (instead of DATA_DIR/train)"
    )
    test_folder: str = _opt("", "folder data: the test images, same class folders (default: DATA_DIR/test if any)")
    test_fraction: float = _opt(
        0.2,
        "folder data without a test folder: the share of each class held out as the test set (the same at every seed)",
    )
    image_size: int = _opt(32, "folder data: the side images are prepared at (largest centred square, resized)")
    cache_dir: str = _opt("", "where prepared folder images and JPEG versions are cached (default ~/.cache/miniresnet)")
    strict: bool = _opt(False, "folder data: an unreadable image is an error instead of being skipped")
    download: bool = _opt(True, "download CIFAR-10 or CIFAR-100 into --data-dir when it is not there")
    verify_data: bool = _opt(True, "check every data file against its published MD5 before use")
    val_split: int = _opt(0, "hold out the last N training images as a validation set (0 = off)")
    seed: int = _opt(0, "seed for weights, data order and augmentation")
    # Machinery: where and how it runs; none of this changes what the recipe computes.
    device: str = _opt("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = _opt(
        "fp32",
        "auto (bf16 where the CPU or GPU computes it natively, else fp32), fp32, bf16 or fp16 (CUDA only) "
        "autocast, bf16-weights (the weights themselves in bf16, BatchNorm in fp32; no autocast), or fp64 "
        "(slow: for numerical checks)",
        choices=PRECISIONS,
    )
    sync_bn: bool = _opt(
        False,
        "with torchrun: BatchNorm statistics over the global batch, summed across "
        "processes (as one process computes them); off: each process normalises its own share",
    )
    cuda_graph: bool = _opt(
        True,
        "on a GPU: record the training step once per image size as a CUDA graph and replay it for each full batch "
        "(the same arithmetic, one launch instead of hundreds); not with torchrun, --compile, --lookahead or fp16",
    )
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and GPU)")
    compile: bool = _opt(
        False,
        "torch.compile the training step's model (meant for GPUs: on the 2-core CPUs measured it was "
        "slower than eager; see benchmarks/RESULTS.md)",
    )
    threads: int = _opt(0, "CPU threads for PyTorch (0 = the cores this process may use)")
    eval_batch_size: int = _opt(100, "images per batch when evaluating (small batches stay in cache: faster on CPU)")
    tensorboard: bool = _opt(False, "also log every epoch's metrics as TensorBoard scalars in --out/tensorboard")
    checkpoint_every: int = _opt(0, "also save last.pt every N optimizer steps within an epoch (0 = at epoch ends)")
    out_dir: str = _opt("runs/latest", "run directory: config.json, metrics.jsonl, checkpoints")
    overwrite: bool = _opt(False, "replace a run already in --out")
    quiet: bool = _opt(False, "no progress bars: one log line per epoch")

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        self.jpeg_qualities = tuple(self.jpeg_qualities)

    def validate(self, train_size: int | None = None) -> None:
        """Refuse values that cannot work, with the reason, before any work is done."""
        from .errors import MiniResNetError

        problems = self.type_problems()
        if problems:  # the checks below compare numbers and names: they need the right types first
            raise MiniResNetError("invalid configuration: " + "; ".join(problems))
        for name in ("epochs", "batch_size", "lr_step_epochs", "blocks_per_stage", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "crop_padding",
            "cutout",
            "val_split",
            "threads",
            "weight_decay",
            "eval_every",
            "checkpoint_every",
            "downscale_epochs",
            "lookahead",
            "freeze_epochs",
            "body_lr_ratio",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.jpeg_p <= 1:
            problems.append(f"jpeg_p must be in [0, 1], got {self.jpeg_p}")
        low, high = (tuple(self.jpeg_qualities) + (0, 0))[:2]
        if len(self.jpeg_qualities) != 2 or not 1 <= low <= high <= 100 or self.jpeg_versions < 1:
            problems.append(
                f"jpeg_qualities must be two qualities 1 <= low <= high <= 100 and jpeg_versions at least 1, got "
                f"{tuple(self.jpeg_qualities)} and {self.jpeg_versions}"
            )
        for name in ("momentum", "warmup", "label_smoothing", "ema"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 8 <= self.image_size <= 512:
            problems.append(f"image_size must be between 8 and 512 pixels, got {self.image_size}")
        if self.downscale_epochs and not 8 <= self.downscale_size <= self.image_size:  # never an upsampling
            problems.append(
                f"downscale_size must be between 8 and the image size ({self.image_size}) when downscale_epochs is "
                f"set, got {self.downscale_size}"
            )
        if not 0 < self.test_fraction < 1:
            problems.append(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if (self.train_folder or self.test_folder) and self.dataset != "folder":
            problems.append("--train-folder and --test-folder need --dataset folder")
        if self.image_size != 32 and self.dataset != "folder":
            problems.append(f"CIFAR images are 32x32; --image-size {self.image_size} is for --dataset folder")
        if not self.init and (self.freeze_epochs or self.freeze_norm or self.body_lr_ratio != 1.0):
            problems.append(
                "freeze_epochs, freeze_norm and body_lr_ratio fine-tune a trained model: give --init MODEL "
                "(such as --init best)"
            )
        if not 0 <= self.distill_weight <= 1 or not self.distill_temperature > 0:
            problems.append(
                f"distill_weight must be in [0, 1] and distill_temperature above 0, got {self.distill_weight} and "
                f"{self.distill_temperature}"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        distilling = {k: getattr(self, k) for k in ("distill_weight", "distill_temperature")}
        if not self.teacher and any(value != defaults[k] for k, value in distilling.items()):
            problems.append("distill_weight and distill_temperature weigh a teacher's probabilities: give --teacher")
        if self.teacher and self.distill_weight == 0:
            problems.append("distill_weight 0 would run the teacher for nothing: drop --teacher, or weigh it")
        if self.teacher_sees_original and not (self.teacher and self.jpeg_p > 0):
            problems.append(
                "teacher_sees_original shows a teacher the images before JPEG compression: give --teacher and --jpeg-p"
            )
        if self.ema and self.precision == "bf16-weights":
            problems.append("ema averages weights in their own precision: bf16-weights is too coarse for it")
        if not self.widths or min(self.widths) < 1:
            problems.append(f"widths must be positive, got {self.widths}")
        if train_size is not None:
            if self.val_split >= train_size:
                problems.append(f"val_split {self.val_split} leaves no training images (of {train_size})")
            elif self.batch_size > train_size - self.val_split:
                problems.append(
                    f"batch_size {self.batch_size} is larger than the {train_size - self.val_split} training images"
                )
        if not 0 < self.lr_step_factor:
            problems.append(f"lr_step_factor must be positive, got {self.lr_step_factor}")
        if self.warmup and self.schedule != "linear":
            problems.append("warmup belongs to the linear schedule: add --schedule linear, or drop --warmup")
        if self.labels != "fine" and self.dataset != "cifar100":
            problems.append(f"labels {self.labels!r} chooses CIFAR-100's label set: it needs --dataset cifar100")
        if self.alternate_flip and not self.flip:
            problems.append("alternate_flip chooses how images are flipped: it needs flipping on (drop --no-flip)")
        if self.optimizer == "muon" and (self.freeze_epochs or self.freeze_norm):
            problems.append(
                "muon holds each filter bank at a fixed norm, so its first step rescales a trained model's filters, "
                "frozen or not: fine-tune with --optimizer sgd or adam"
            )
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        problems += self.architecture_problems()
        if problems:
            raise MiniResNetError("invalid configuration: " + "; ".join(problems))

    def type_problems(self) -> list[str]:
        """Each field's value against its type and, where it has them, its choices: a config.json
        edited by hand or a TrainConfig built in Python gets no check from the command line's parser
        (a string "false" is true, an unknown optimizer name would quietly train another)."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not has_type(value, f.type):
                problems.append(f"{f.name} must be {TYPE_NAMES[f.type]}, got {value!r}")
            elif "choices" in f.metadata and value not in f.metadata["choices"]:
                problems.append(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        return problems

    def architecture_problems(self) -> list[str]:
        """The bounds every model file is checked against (checkpoint.py), applied before training:
        a run must not train for hours a model that nothing can load."""
        from .checkpoint import MAX_BLOCKS_PER_STAGE, MAX_STAGES, MAX_WIDTH

        problems = []
        if not 1 <= len(self.widths) <= MAX_STAGES or max(self.widths, default=0) > MAX_WIDTH:
            problems.append(
                f"widths must be 1 to {MAX_STAGES} stages of at most {MAX_WIDTH} channels, got {self.widths}"
            )
        if self.blocks_per_stage > MAX_BLOCKS_PER_STAGE:
            problems.append(f"blocks_per_stage must be at most {MAX_BLOCKS_PER_STAGE}, got {self.blocks_per_stage}")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """The configuration a run's config.json records; keys of no field (such as "resolved") are left out."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in fields})

    def epoch_equivalents(self) -> float:
        """The training compute in full-resolution epochs, a figure that holds on any machine: an
        epoch at a downscaled size s counts (s / image size)^2 of one."""
        downscaled = min(self.downscale_epochs, self.epochs)
        return downscaled * (self.downscale_size / self.image_size) ** 2 + self.epochs - downscaled


# The SGD recipe of the other presets: each choice was made on a 5,000-image validation split
# (benchmarks/ablation.py; benchmarks/RESULTS.md has the figures).
SGD_RECIPE = TrainConfig(
    batch_size=256,
    optimizer="sgd",
    lr=0.4,
    momentum=0.9,
    weight_decay=5e-4,
    decay_norm_and_bias=True,
    schedule="linear",
    warmup=0.15,
    label_smoothing=0.1,
    zero_init_residual=True,
    downscale_size=24,
    tta="flip-translate",
    precision="auto",
    eval_every=4,
)
# Time to accuracy: the SGD recipe with Muon for the convolution filters and lighter crops, its
# first epochs at 16x16. Compute is counted in full-resolution epoch equivalents (a 16x16
# epoch is 0.25 of one): quick spends 4, fast 8.
SHORT_RECIPE = dataclasses.replace(SGD_RECIPE, optimizer="muon", muon_lr=0.05, crop_padding=2, downscale_size=16)

PRESETS: dict[str, TrainConfig] = {
    # The seed recipe, exactly as specified (the defaults above).
    "seed": TrainConfig(),
    # The seed recipe's accuracy (86.7%, plain) with the least compute that clears it by a margin.
    "quick": dataclasses.replace(SHORT_RECIPE, epochs=7, downscale_epochs=4),
    # 90% (with TTA) and 89.5% plain with 43% of the compute of the SGD recipe that first reached them.
    "fast": dataclasses.replace(SHORT_RECIPE, epochs=14, downscale_epochs=8),
    # The highest accuracy in a bounded budget (90 minutes on a 2-core AVX-512-BF16 CPU): the SGD
    # recipe run long (200 epochs, half at 24x24), plus cutout, since a long run overfits the
    # training set.
    "best": dataclasses.replace(SGD_RECIPE, epochs=200, warmup=0.05, downscale_epochs=100, eval_every=10, cutout=12),
    # Your own classes from tens to a few thousand images each, starting from the shipped best model
    # (or --init MODEL). Chosen with benchmarks/finetune.py on a validation split of five CIFAR-10
    # classes that a model trained on the other five never saw (3 seeds per row, at 20, 100 and 500
    # images per class): the new last layer at lr 0.2, the layers taken from the model at 0.1 of it,
    # for 100 epochs; freezing, frozen BatchNorm, cutout and EMA did not help (benchmarks/RESULTS.md,
    # "Fine-tuning", has the figures).
    "finetune": dataclasses.replace(
        SGD_RECIPE,
        init="best",
        epochs=100,
        batch_size=32,
        lr=0.2,
        warmup=0.1,
        body_lr_ratio=0.1,
        eval_every=0,
    ),
}
