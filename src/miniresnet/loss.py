"""The training loss: cross-entropy against the labels (with label smoothing), and, with a teacher,
knowledge distillation (Hinton et al., 2015): the student also matches the teacher's probabilities
on the same augmented batch, both softened by a temperature T. The distillation term is scaled by
T^2 so that its gradients keep their size as T changes.

The teacher is any trained MiniResNet of the same classes (wider or deeper ones too), read from a
shipped name, a checkpoint or an export, or several of them ("best,best-jpeg"), whose logits are
averaged: an ensemble answers better than each of its members. It sees each batch as the student
does, renormalised from the student's mean and std to its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MiniResNetError


class Teacher(nn.Module):
    """A trained model in eval mode that takes the student's normalised batches: each channel is
    mapped from the student's normalisation to the teacher's (x * scale + shift) first."""

    def __init__(self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> Teacher:  # a teacher's BatchNorm always uses its running statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(self.model(x * self.scale.to(x.dtype) + self.shift.to(x.dtype)))


class Ensemble(nn.Module):
    """Several teachers answering as one: the mean of their logits."""

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([teacher(x) for teacher in self.teachers]).mean(dim=0)


def load_teacher(
    source: str, classes: tuple[str, ...], image_size: int, mean: torch.Tensor, std: torch.Tensor
) -> tuple[Teacher | Ensemble, dict]:
    """The teacher named by `source` for a student of these classes, image size and input
    normalisation, and what the run records about it (name, sha256, architecture, classes).
    Several models separated by commas make an ensemble, recorded with each member's record and
    one sha256 over theirs (what a resume compares)."""
    names = teacher_names(source)
    if len(names) == 1:
        return load_one_teacher(source, classes, image_size, mean, std)
    loaded = [load_one_teacher(name, classes, image_size, mean, std) for name in names]
    members = [record for _, record in loaded]
    sha256 = hashlib.sha256(",".join(sorted(member["sha256"] for member in members)).encode()).hexdigest()
    return Ensemble([teacher for teacher, _ in loaded]), {"model": source, "sha256": sha256, "members": members}


def teacher_names(source: str) -> list[str]:
    """The models `--teacher source` names: one, or several separated by commas (an ensemble)."""
    names = [name.strip() for name in source.split(",")]
    if len(names) == 1:
        return [source]
    if not all(names) or len(set(names)) < len(names):
        raise MiniResNetError(f"--teacher {source}: name each model of an ensemble once, separated by commas")
    return names


def load_one_teacher(
    source: str, classes: tuple[str, ...], image_size: int, mean: torch.Tensor, std: torch.Tensor
) -> tuple[Teacher, dict]:
    """One model of a teacher (see load_teacher)."""
    from .checkpoint import model_file_sha256, model_from_checkpoint, read_model

    model = model_from_checkpoint(read_model(source), source)
    if list(model.classes) != list(classes):
        raise MiniResNetError(
            f"--teacher {source} predicts the classes {list(model.classes)}; this run's are {list(classes)}: "
            "a teacher needs the same classes in the same order"
        )
    if model.image_size != image_size:
        raise MiniResNetError(
            f"--teacher {source} was trained on {model.image_size}x{model.image_size} images and this run prepares "
            f"{image_size}x{image_size}: give a teacher trained at that size"
        )
    # student's normalised x -> pixels in [0, 1] -> the teacher's normalisation
    scale = std / model.std
    shift = (mean - model.mean) / model.std
    record = {
        "model": source,
        "sha256": model_file_sha256(source),
        "arch": model.arch(),
        "classes": list(model.classes),
    }
    return Teacher(model, scale.float(), shift.float()), record


def refuse_other_teacher(record: dict | None, saved: dict | None, run_dir: str | Path) -> None:
    """Refuse to resume a run with a teacher other than the one it started with (or with one where
    it had none, or none where it had one): it would carry on learning from other probabilities
    without a word. `record` is this resume's teacher, `saved` the checkpoint's (None: none)."""
    if record is None and saved is None:
        return
    if record is None or saved is None:
        had = f"learned from the teacher {saved['model']}" if saved else "learned from no teacher"
        now = f"is given the teacher {record['model']}" if record else "is given none"
        raise MiniResNetError(f"the run in {run_dir} {had} and {now}: resume it as it started, or start a new run")
    if saved["sha256"] != record["sha256"]:
        raise MiniResNetError(
            f"the run in {run_dir} learned from a teacher of sha256 {saved['sha256']} ({saved['model']}); "
            f"{record['model']} now has sha256 {record['sha256']}: resume with the same teacher, or start a new run"
        )


@dataclass(frozen=True)
class TrainingLoss:
    """loss(logits, x, y): the mean cross-entropy against the labels `y` with `label_smoothing`;
    with a `teacher`, (1 - weight) of it plus `weight` times the distillation term, the teacher
    seeing the batch `x` (the model's own input, or the same images before JPEG compression)."""

    label_smoothing: float = 0.0
    teacher: Teacher | Ensemble | None = None
    weight: float = 0.5
    temperature: float = 4.0

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(at_least_fp32(logits), y, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return loss
        return (1 - self.weight) * loss + self.weight * distillation_term(logits, self.teacher(x), self.temperature)


def distillation_term(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 times the mean over the batch of KL(teacher || student), both softmaxes at temperature T."""
    student = F.log_softmax(at_least_fp32(logits) / temperature, dim=1)
    teacher = F.log_softmax(at_least_fp32(teacher_logits) / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 and fp16 logits (from autocast) in float32 for the softmaxes; float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
