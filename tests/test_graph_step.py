"""The training step made ready for a CUDA graph (step.GraphStep: static buffers, the lr in device
tensors, state restored after its warm-up) computes what the ordinary eager step does. On a CPU
it runs eagerly and is compared in float64; on a GPU (tests skipped without one) the recorded
graph is compared with the eager step, and checked never to make the host wait inside an epoch."""

import copy
import dataclasses

import pytest
import torch

from conftest import gpu_waits, interrupt_training_at, synthetic_images, tiny_config
from miniresnet.checkpoint import portable_optimizer_state
from miniresnet.config import TrainConfig
from miniresnet.ema import EMA
from miniresnet.images import jpeg_versions
from miniresnet.loader import BatchLoader
from miniresnet.loss import Teacher, TrainingLoss
from miniresnet.model import MiniResNet
from miniresnet.runtime import Precision, model_in_precision, resolve_precision
from miniresnet.step import GraphStep
from miniresnet.train import build_optimizer, learning_rate, train, train_steps

FP64 = Precision("fp64", weights=torch.float64)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)"
)

RECIPES = {
    "sgd": TrainConfig(optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="linear", warmup=0.2, epochs=2),
    "muon": TrainConfig(optimizer="muon", lr=0.05, muon_lr=0.05, weight_decay=5e-4, schedule="linear", epochs=2),
    "adam": TrainConfig(optimizer="adam", lr=3e-3, epochs=2),
    # fine-tuning: the body at 0.3 of the lr, frozen in the first epoch
    "finetune": TrainConfig(optimizer="sgd", lr=0.05, init="x", body_lr_ratio=0.3, freeze_epochs=1, epochs=2),
    # knowledge distillation: a wider teacher's probabilities at T = 3 weigh 0.7 of the loss
    "distilled": TrainConfig(
        optimizer="muon", lr=0.05, muon_lr=0.05, teacher="x", distill_weight=0.7, distill_temperature=3.0, epochs=2
    ),
    # the teacher sees the originals of the JPEG-compressed images the model sees
    "distilled-original": TrainConfig(
        optimizer="sgd", lr=0.05, teacher="x", jpeg_p=0.5, teacher_sees_original=True, epochs=2
    ),
}


def training_loss_for(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> TrainingLoss:
    """The recipe's loss with label smoothing 0.1; with a teacher, a fixed random wider model that
    renormalises its input."""
    if not cfg.teacher:
        return TrainingLoss(0.1)
    with torch.random.fork_rng():  # the teacher's own initial weights; the run's random stream is untouched
        torch.manual_seed(7)
        teacher = Teacher(MiniResNet((8, 8, 16), 1), torch.tensor([0.9, 1.1, 1.2]), torch.tensor([0.1, -0.2, 0.05]))
    return TrainingLoss(0.1, teacher.to(device, dtype), cfg.distill_weight, cfg.distill_temperature)


def loader_for(
    device: torch.device, n: int = 90, batch: int = 20, dtype=torch.float64, originals: bool = False
) -> BatchLoader:
    """90 images in batches of 20: every epoch ends with a partial batch of 10. With `originals`,
    half the images are swapped for compressed versions and batches carry the originals too."""
    images, labels = synthetic_images(n)
    data = torch.from_numpy(images), torch.from_numpy(labels).long()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    options = dict(shuffle=True, crop_padding=2, flip=True, cutout=4, seed=3, device=device, dtype=dtype)
    if originals:
        versions = jpeg_versions(data[0], 2, (30, 60), seed=0, progress=False)
        options |= dict(jpeg_versions=versions, jpeg_p=0.5, originals_too=True)
    return BatchLoader(*data, batch, mean, std, **options)


def run_epochs(cfg: TrainConfig, graph: bool, device: torch.device, precision: Precision, epochs=(0, 1), state=None):
    """Train a small model through train_steps, eagerly or through a GraphStep; the model,
    optimizer and EMA after the epochs, and every step's loss."""
    torch.manual_seed(0)
    model = model_in_precision(MiniResNet((4, 8, 8), 1), precision, device)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, 0.9)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
    loader = loader_for(device, dtype=precision.weights, originals=cfg.teacher_sees_original)
    loss_fn = training_loss_for(cfg, device, precision.weights)
    step = GraphStep(
        model,
        optimizer,
        precision=precision,
        loss_fn=loss_fn,
        batch_size=loader.batch_size,
        capture=device.type == "cuda",
    )
    losses = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for tally in train_steps(
            model,
            optimizer,
            loader,
            lambda s: learning_rate(cfg, s, len(loader)),
            epoch,
            precision=precision,
            loss_fn=loss_fn,
            ema=ema,
            body_lr_scale=0.0 if epoch < cfg.freeze_epochs else cfg.body_lr_ratio,
            graph_step=step if graph else None,
        ):
            losses.append(tally.on_device["loss_sum"].item())
    return model, optimizer, ema, losses


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, rtol: float, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("recipe", RECIPES)
def test_graph_ready_step_computes_what_the_eager_step_does_in_float64(recipe):
    """Two epochs (each ending with a partial batch), with EMA and label smoothing: the weights, the
    EMA average, the BatchNorm statistics, the optimizer state and every step's loss agree to
    float64 rounding."""
    cpu = torch.device("cpu")
    eager = run_epochs(RECIPES[recipe], graph=False, device=cpu, precision=FP64)
    ready = run_epochs(RECIPES[recipe], graph=True, device=cpu, precision=FP64)
    assert_same_weights(eager[0], ready[0], rtol=1e-10, atol=1e-12)
    assert_same_weights(eager[2].model, ready[2].model, rtol=1e-10, atol=1e-12)
    for state_a, state_b in zip(eager[1].state.values(), ready[1].state.values(), strict=True):
        for key, value in state_a.items():
            torch.testing.assert_close(value.double(), state_b[key].double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(eager[3]), torch.tensor(ready[3]), rtol=1e-10, atol=1e-12)
    assert not any(isinstance(g["lr"], torch.Tensor) for g in eager[1].param_groups)
    assert all(isinstance(g["lr"], torch.Tensor) for g in ready[1].param_groups)


@pytest.mark.parametrize("recipe", ["sgd", "muon", "adam"])
@pytest.mark.parametrize("steps_before", [0, 1])
def test_warm_up_steps_before_recording_are_undone(recipe, steps_before):
    """What GraphStep does before it records (on a GPU), run here on the CPU: three warm-up steps,
    then weights, BatchNorm statistics and optimizer state put back. The run then goes on exactly
    as a twin that never warmed up, whether its optimizer had state already (put back) or not
    (created by the warm-up and zeroed, which is what a first step starts from)."""
    cfg = RECIPES[recipe]
    torch.manual_seed(0)
    model = MiniResNet((4, 8, 8), 1).double()
    twin = copy.deepcopy(model)
    steps = [GraphStep(m, build_optimizer(m, cfg), precision=FP64, batch_size=20, capture=False) for m in (model, twin)]
    batches = list(loader_for(torch.device("cpu")).batches())
    for step in steps:
        step.set_lr(0.05)
        for x, y in batches[:steps_before]:
            step(x, y)
    saved = steps[0]._snapshot()
    for _ in range(3):
        steps[0](*batches[2])
    steps[0]._restore(saved)
    for step in steps:
        for x, y in batches[steps_before : steps_before + 2]:
            step(x, y)
    assert_same_weights(model, twin, rtol=1e-12, atol=1e-14)
    for state_a, state_b in zip(steps[0].optimizer.state.values(), steps[1].optimizer.state.values(), strict=True):
        for key, value in state_a.items():
            torch.testing.assert_close(value, state_b[key], rtol=1e-12, atol=1e-14)


def test_the_lr_tensor_follows_the_schedule_and_fine_tuning_scales_the_body():
    model = MiniResNet((4, 8, 8), 1)
    optimizer = build_optimizer(model, RECIPES["finetune"])
    step = GraphStep(model, optimizer, precision=FP64, batch_size=20, capture=False)
    step.set_lr(0.2, body_lr_scale=0.25)
    lrs = {g["body"]: g["lr"].item() for g in optimizer.param_groups}
    assert lrs == {True: pytest.approx(0.05), False: pytest.approx(0.2)}


def test_fp16_is_refused_by_the_graph_step():
    model = MiniResNet((4, 8, 8), 1)
    with pytest.raises(ValueError, match="fp16"):
        GraphStep(model, build_optimizer(model, TrainConfig()), precision=Precision("fp16"), batch_size=4, capture=True)


def test_a_graph_runs_checkpoint_resumes_eagerly_as_if_unbroken():
    """A run whose step was the graph's holds its lr in tensors; its checkpoint stores numbers, and
    an eager run resumed from it continues as one that was never stopped (float64)."""
    cpu, cfg = torch.device("cpu"), RECIPES["muon"]
    model, optimizer, ema, _ = run_epochs(cfg, graph=True, device=cpu, precision=FP64, epochs=(0,))
    state = {"model": model.state_dict(), "optimizer": portable_optimizer_state(optimizer), "ema": ema.state_dict()}
    assert all(type(g["lr"]) is float for g in state["optimizer"]["param_groups"])
    resumed = run_epochs(cfg, graph=False, device=cpu, precision=FP64, epochs=(1,), state=copy.deepcopy(state))
    unbroken = run_epochs(cfg, graph=False, device=cpu, precision=FP64)
    assert_same_weights(resumed[0], unbroken[0], rtol=1e-10, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("recipe", ["sgd", "muon", "adam", "distilled", "distilled-original"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
def test_recorded_graph_matches_the_eager_step_on_the_gpu(recipe, precision):
    """Four epochs of 5 steps (4 replays and one eager partial batch each), 20 steps in all: the
    recorded graph and the eager step agree within bf16 rounding."""
    cuda = torch.device("cuda")
    resolved = resolve_precision(precision, cuda)
    cfg = dataclasses.replace(RECIPES[recipe], epochs=4)
    eager = run_epochs(cfg, graph=False, device=cuda, precision=resolved, epochs=(0, 1, 2, 3))
    graph = run_epochs(cfg, graph=True, device=cuda, precision=resolved, epochs=(0, 1, 2, 3))
    tolerance = 2e-2 if precision.startswith("bf16") else 1e-3
    assert_same_weights(eager[0], graph[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(torch.tensor(eager[3]), torch.tensor(graph[3]), rtol=tolerance, atol=tolerance)


@needs_cuda
def test_recorded_graph_makes_the_host_wait_only_when_the_tally_is_read():
    from miniresnet.train import READ_EVERY

    cuda = torch.device("cuda")
    cfg = RECIPES["muon"]
    model = MiniResNet((4, 8, 8), 1).to(cuda)
    optimizer = build_optimizer(model, cfg)
    loader = loader_for(cuda, n=400, batch=4, dtype=torch.float32)
    step = GraphStep(model, optimizer, precision=resolve_precision("bf16", cuda), batch_size=4, capture=True)
    steps = train_steps(model, optimizer, loader, lambda s: 0.01, 0, precision=step.precision, graph_step=step)
    next(steps)  # records the graph
    taken, waits = gpu_waits(steps)
    assert 1 + taken == len(loader)
    assert len(waits) <= 3 * (len(loader) // READ_EVERY), waits


@needs_cuda
def test_graph_run_interrupted_and_resumed_ends_where_an_unbroken_one_does(tiny_data, tmp_path, monkeypatch):
    """Stopped mid-epoch 2 (during step 13, at 8 steps an epoch) and resumed, which records a new graph: the run
    ends with the unbroken run's weights, to within the GPU's run-to-run rounding."""
    from miniresnet.checkpoint import load_checkpoint
    from miniresnet.rundir import TrainingInterrupted

    recipe = dict(device="cuda", epochs=3, batch_size=20, optimizer="muon", lr=0.05, schedule="linear", ema=0.9)
    train(tiny_config(tiny_data, tmp_path / "whole", **recipe))
    restore_schedule = interrupt_training_at(monkeypatch, 12)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_data, tmp_path / "broken", **recipe))
    restore_schedule()
    train(tiny_config(tiny_data, tmp_path / "broken", **recipe), resume=True)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["weights"]
    b = load_checkpoint(tmp_path / "broken" / "last.pt")["weights"]
    for name in a:
        torch.testing.assert_close(a[name].double(), b[name].double(), rtol=1e-3, atol=1e-4, msg=name)
