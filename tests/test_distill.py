"""Knowledge distillation: the loss against a float64 reference, the teacher's renormalisation,
and a distilled run end to end (what it records, what it refuses)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_training_at, tiny_config
from miniresnet.checkpoint import FORMAT, load_checkpoint
from miniresnet.config import TrainConfig
from miniresnet.errors import MiniResNetError
from miniresnet.loss import Teacher, TrainingLoss, distillation_term, load_teacher
from miniresnet.model import MiniResNet
from miniresnet.train import train


def reference_distillation(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * mean over images of sum_k p_k (log p_k - log q_k), p the teacher's and q the student's
    softmax at temperature T, written out in float64."""
    p = torch.softmax(teacher.double() / t, dim=1)
    log_q = torch.log_softmax(student.double() / t, dim=1)
    return t**2 * (p * (p.log() - log_q)).sum(1).mean()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_the_distillation_term_is_the_kl_divergence_scaled_by_t_squared(t):
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10, dtype=torch.float64) * 3, torch.randn(16, 10, dtype=torch.float64) * 3
    torch.testing.assert_close(distillation_term(student, teacher, t), reference_distillation(student, teacher, t))
    assert distillation_term(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_the_distillation_gradient_pulls_the_student_toward_the_teacher():
    """d/dz of T^2 KL(p || softmax(z / T)) is T (softmax(z / T) - p) / batch: the gradient that
    carries the teacher's view of the wrong classes."""
    torch.manual_seed(1)
    t = 3.0
    student = (torch.randn(8, 5, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(8, 5, dtype=torch.float64) * 2
    reference_distillation(student, teacher, t).backward()
    expected = t * (torch.softmax(student.detach() / t, 1) - torch.softmax(teacher / t, 1)) / len(student)
    torch.testing.assert_close(student.grad, expected)


def test_without_a_teacher_the_loss_is_the_plain_cross_entropy():
    """In fp32 and under bf16 autocast (where cross-entropy runs in fp32 either way): the same loss
    to the bit as before the loss had a teacher, and the same gradient."""
    torch.manual_seed(2)
    weights, features, labels = torch.randn(10, 16), torch.randn(32, 16), torch.randint(0, 10, (32,))
    for autocast in (False, True):
        results = []
        for loss_of in (
            lambda z: TrainingLoss(0.1)(z, None, labels),
            lambda z: F.cross_entropy(z, labels, label_smoothing=0.1),
        ):
            w = weights.clone().requires_grad_()
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = loss_of(features @ w.T)
            loss.backward()
            results.append((loss.detach(), w.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_the_loss_weighs_the_labels_and_the_teacher():
    torch.manual_seed(3)
    model = MiniResNet((4, 8, 8), 1).double()
    teacher = Teacher(model, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (6,))
    logits = torch.randn(6, 10, dtype=torch.float64)
    loss = TrainingLoss(0.1, teacher, weight=0.25, temperature=2.0)(logits, x, y)
    expected = 0.75 * F.cross_entropy(logits, y, label_smoothing=0.1) + 0.25 * reference_distillation(
        logits, model.eval()(x), 2.0
    )
    torch.testing.assert_close(loss, expected)


def test_the_teacher_sees_each_image_normalised_its_own_way(tmp_path):
    """A student normalised with one mean and std, a teacher trained with another: the teacher's
    logits on the student's batch are its logits on the same pixels normalised its way."""
    torch.manual_seed(4)
    model = MiniResNet((4, 8, 8), 1)
    teacher_mean, teacher_std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    path = tmp_path / "teacher.pt"
    state = {"format": FORMAT, "arch": model.arch(), "weights": model.state_dict()}
    state |= {"classes": [str(i) for i in range(10)], "mean": teacher_mean.tolist(), "std": teacher_std.tolist()}
    torch.save(state, path)
    loaded = load_checkpoint(path)  # the checkpoint format's own reader accepts it
    assert loaded["arch"] == model.arch()
    student_mean, student_std = torch.tensor([0.45, 0.46, 0.41]), torch.tensor([0.22, 0.21, 0.24])
    teacher, record = load_teacher(str(path), tuple(state["classes"]), 32, student_mean, student_std)
    teacher = teacher.double()
    pixels = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    student_x = (pixels - student_mean.double().view(1, 3, 1, 1)) / student_std.double().view(1, 3, 1, 1)
    teacher_x = (pixels - teacher_mean.double().view(1, 3, 1, 1)) / teacher_std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(teacher(student_x), model.double().eval()(teacher_x))
    assert record["arch"] == model.arch() and len(record["sha256"]) == 64
    teacher.train()  # a training loop's .train() leaves a teacher's BatchNorm on its running statistics
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture
def teacher_file(tiny_data, tmp_path):
    """A model trained on the tiny data: the teacher of the runs below."""
    train(tiny_config(tiny_data, tmp_path / "teacher", epochs=1, widths=(8, 16, 16)))
    return tmp_path / "teacher" / "last.pt"


def test_a_distilled_run_records_its_teacher_and_leaves_it_unchanged(tiny_data, tmp_path, teacher_file, monkeypatch):
    """The run records which teacher it learned from; the teacher in memory ends the run as it
    started (its weights and BatchNorm statistics: it never trains)."""
    import miniresnet.train as train_module

    real_training_loss, made = train_module.training_loss, []

    def training_loss_kept(*args, **kwargs):
        loss_fn, record = real_training_loss(*args, **kwargs)
        made.append((loss_fn.teacher, copy.deepcopy(loss_fn.teacher.state_dict())))
        return loss_fn, record

    monkeypatch.setattr(train_module, "training_loss", training_loss_kept)
    out = tmp_path / "student"
    summary = train(tiny_config(tiny_data, out, epochs=2, teacher=str(teacher_file), distill_weight=0.6))
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"] == str(teacher_file) and config["distill_weight"] == 0.6
    recorded = config["resolved"]["teacher"]
    assert recorded["arch"]["widths"] == [8, 16, 16] and recorded == summary["teacher"]
    assert load_checkpoint(out / "last.pt")["teacher"] == recorded
    [(teacher, before)] = made
    after = teacher.state_dict()
    assert "model.features.0.1.running_mean" in after
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included


def test_distillation_changes_what_is_learned(tiny_data, tmp_path, teacher_file):
    """The same run with and without the teacher ends with other weights (the term is not a no-op)."""
    plain = train(tiny_config(tiny_data, tmp_path / "plain", epochs=1))
    distilled = train(tiny_config(tiny_data, tmp_path / "distilled", epochs=1, teacher=str(teacher_file)))
    assert plain["test_loss"] != distilled["test_loss"]
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["weights"] for name in ("plain", "distilled"))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_a_distilled_run_resumes_exactly_and_only_with_its_teacher(tiny_data, tmp_path, teacher_file, monkeypatch):
    teacher = tmp_path / "my-teacher.pt"
    shutil.copy(teacher_file, teacher)
    cfg = tiny_config(tiny_data, tmp_path / "whole", epochs=2, teacher=str(teacher))
    whole = train(cfg)
    broken = dataclasses.replace(cfg, out_dir=str(tmp_path / "broken"))
    restore_schedule = interrupt_training_at(monkeypatch, 10)  # mid-epoch 2 (8 steps an epoch)
    with pytest.raises(MiniResNetError, match="--resume"):
        train(broken)
    restore_schedule()
    state = load_checkpoint(teacher)
    state["weights"]["fc.bias"] += 0.01  # the same path, another model
    torch.save(state, teacher)
    with pytest.raises(MiniResNetError, match="learned from a teacher of sha256 .* resume with the same teacher"):
        train(broken, resume=True)
    with pytest.raises(MiniResNetError, match="learned from the teacher .* and is given none"):
        train(dataclasses.replace(broken, teacher=""), resume=True)
    teacher.unlink()
    with pytest.raises(MiniResNetError, match="the teacher this run learns from: .*give its new place with --teacher"):
        train(broken, resume=True)
    moved = tmp_path / "moved-teacher.pt"
    shutil.copy(teacher_file, moved)
    resumed = train(dataclasses.replace(broken, teacher=str(moved)), resume=True)
    assert resumed["test_acc"] == whole["test_acc"] and resumed["test_loss"] == whole["test_loss"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(distill_weight=0.3), "give --teacher"),
        (dict(teacher="best", distill_weight=1.5), "distill_weight must be in"),
        (dict(teacher="best", distill_temperature=0.0), "distill_temperature above 0"),
        (dict(teacher="best", distill_weight=0.0), "would run the teacher for nothing"),
        (dict(teacher="best", teacher_sees_original=True), "give --teacher and --jpeg-p"),
        (dict(jpeg_p=0.5, teacher_sees_original=True), "give --teacher and --jpeg-p"),
    ],
)
def test_distillation_options_are_checked(overrides, message):
    with pytest.raises(MiniResNetError, match=message):
        TrainConfig(**overrides).validate()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(classes=[f"class {i}" for i in range(10)]), "teacher needs the same classes in the same order"),
        (dict(image_size=24), "was trained on 24x24 images and this run prepares 32x32"),
    ],
)
def test_a_teacher_that_does_not_fit_is_one_clear_error(tiny_data, tmp_path, teacher_file, change, message):
    state = load_checkpoint(teacher_file) | change
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(MiniResNetError, match=message):
        train(tiny_config(tiny_data, tmp_path / "student", epochs=1, teacher=str(tmp_path / "other.pt")))


def test_a_teacher_that_sees_the_originals_is_given_them(tiny_data, tmp_path, teacher_file, monkeypatch, capsys):
    """With --teacher-sees-original, at every step the model gets the batch's possibly compressed
    images and the teacher the originals the loader carries beside them."""
    import miniresnet.train as train_module

    real_train_steps, seen = train_module.train_steps, []

    def train_steps_watched(model, optimizer, loader, *args, loss_fn, **kwargs):
        model_inputs = []
        model.register_forward_pre_hook(lambda _module, inputs: model_inputs.append(inputs[0].clone()))

        def loss_watched(logits, teacher_x, y):
            seen.append((model_inputs[-1], teacher_x.clone()))
            return loss_fn(logits, teacher_x, y)

        batches = [(x.clone(), originals.clone()) for x, _, originals in loader.batches(0)]
        yield from real_train_steps(model, optimizer, loader, *args, loss_fn=loss_watched, **kwargs)
        assert [(torch.equal(a, x), torch.equal(b, o)) for (a, b), (x, o) in zip(seen, batches, strict=True)] == [
            (True, True)
        ] * len(batches)
        assert any(not torch.equal(x, o) for x, o in batches)  # some images were compressed
        seen.append("epoch checked")

    monkeypatch.setattr(train_module, "train_steps", train_steps_watched)
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1, teacher=str(teacher_file), jpeg_p=0.5)
    train(dataclasses.replace(cfg, teacher_sees_original=True, cache_dir=str(tmp_path), quiet=False))
    assert seen[-1] == "epoch checked"
    assert "where the model sees a JPEG-compressed image, the teacher sees the original" in capsys.readouterr().err


def test_an_ensemble_of_teachers_answers_with_the_mean_of_their_logits(tmp_path):
    """--teacher a,b: the teacher's logits are the mean of each member's logits (each renormalised
    its own way), compared in float64; the record names each member and hashes them in any order."""
    torch.manual_seed(5)
    classes = tuple(str(i) for i in range(10))
    members = []
    for name, widths, mean in (("a", (4, 8, 8), [0.5, 0.4, 0.3]), ("b", (8, 8, 16), [0.4, 0.5, 0.45])):
        model = MiniResNet(widths, 1)
        state = {"format": FORMAT, "arch": model.arch(), "weights": model.state_dict(), "classes": list(classes)}
        torch.save(state | {"mean": mean, "std": [0.25, 0.2, 0.3]}, tmp_path / f"{name}.pt")
        members.append((model.double().eval(), torch.tensor(mean, dtype=torch.float64)))
    student_mean, student_std = torch.tensor([0.45, 0.46, 0.41]), torch.tensor([0.22, 0.21, 0.24])
    source = f"{tmp_path / 'a.pt'}, {tmp_path / 'b.pt'}"
    ensemble, record = load_teacher(source, classes, 32, student_mean, student_std)
    pixels = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    student_x = (pixels - student_mean.double().view(1, 3, 1, 1)) / student_std.double().view(1, 3, 1, 1)
    teacher_std = torch.tensor([0.25, 0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    expected = sum(model((pixels - mean.view(1, 3, 1, 1)) / teacher_std) for model, mean in members) / 2
    torch.testing.assert_close(ensemble.double()(student_x), expected)
    assert [m["arch"]["widths"] for m in record["members"]] == [[4, 8, 8], [8, 8, 16]]
    assert record["model"] == source and len(record["sha256"]) == 64
    _, swapped = load_teacher(f"{tmp_path / 'b.pt'},{tmp_path / 'a.pt'}", classes, 32, student_mean, student_std)
    assert swapped["sha256"] == record["sha256"]  # the mean does not depend on the order
    _, alone = load_teacher(str(tmp_path / "a.pt"), classes, 32, student_mean, student_std)
    assert alone["sha256"] != record["sha256"]
    for bad in (f"{tmp_path / 'a.pt'},", f"{tmp_path / 'a.pt'},{tmp_path / 'a.pt'}"):
        with pytest.raises(MiniResNetError, match="name each model of an ensemble once"):
            load_teacher(bad, classes, 32, student_mean, student_std)


def test_a_run_distilled_from_an_ensemble_records_and_names_each_member(tiny_data, tmp_path, teacher_file, capsys):
    second = tmp_path / "second-teacher"
    train(tiny_config(tiny_data, second, epochs=1, widths=(8, 8, 16), seed=1))
    source = f"{teacher_file},{second / 'last.pt'}"
    out = tmp_path / "student"
    summary = train(dataclasses.replace(tiny_config(tiny_data, out, epochs=1, teacher=source), quiet=False))
    recorded = json.loads((out / "config.json").read_text())["resolved"]["teacher"]
    assert recorded == summary["teacher"] == load_checkpoint(out / "last.pt")["teacher"]
    assert [m["model"] for m in recorded["members"]] == [str(teacher_file), str(second / "last.pt")]
    assert "learning from the mean logits of the teachers " in capsys.readouterr().err
    single = train(tiny_config(tiny_data, tmp_path / "single", epochs=1, teacher=str(teacher_file)))
    assert single["test_loss"] != summary["test_loss"]  # the second member changes what is learned
