import pytest
import torch

from conftest import tiny_config
from miniresnet.checkpoint import load_checkpoint
from miniresnet.config import TrainConfig
from miniresnet.model import MiniResNet
from miniresnet.muon import MuonSGD, orthogonalize
from miniresnet.train import build_optimizer, train


def test_orthogonalize_sets_the_singular_values_near_one_and_keeps_the_directions():
    matrix = torch.randn(16, 144, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = orthogonalize(matrix)
    assert result.dtype == torch.float64 and result.shape == (16, 144)
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.6 and singular.max() < 1.25  # what five Newton-Schulz steps promise
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    exact = u @ vh
    assert torch.nn.functional.cosine_similarity(result.flatten(), exact.flatten(), dim=0) > 0.95
    tall = orthogonalize(matrix.T)  # the transpose gives the transposed result
    assert torch.allclose(tall, result.T)


def test_filters_take_steps_of_lr_relative_to_a_fixed_norm_and_the_rest_take_nesterov_sgd():
    generator = torch.Generator().manual_seed(1)
    filters = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64) * 3)
    bias = torch.nn.Parameter(torch.randn(8, generator=generator, dtype=torch.float64))
    reference = torch.nn.Parameter(bias.detach().clone())
    optimizer = MuonSGD(
        [{"params": [filters], "orthogonal": True, "lr_ratio": 0.5}, {"params": [bias], "weight_decay": 0.01}],
        lr=0.2,
        momentum=0.9,
    )
    sgd = torch.optim.SGD([reference], lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        filters.grad = torch.randn(filters.shape, generator=generator, dtype=torch.float64)
        bias.grad = torch.randn(bias.shape, generator=generator, dtype=torch.float64)
        reference.grad = bias.grad.clone()
        before = filters.detach().clone()
        before *= 8**0.5 / before.norm()  # the norm the step starts from
        optimizer.step()
        sgd.step()
        relative = (filters.detach() - before).norm() / before.norm()
        assert 0.6 * 0.1 < relative < 1.25 * 0.1  # lr x lr_ratio, up to Newton-Schulz's precision
        assert torch.allclose(bias, reference, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="4-D"):
        MuonSGD([{"params": [bias], "orthogonal": True}], lr=0.1, momentum=0.9)


def test_muon_config_gives_the_filters_to_muon_and_everything_else_to_sgd():
    model = MiniResNet()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.4, muon_lr=0.1, weight_decay=5e-4))
    (filters,) = [g for g in optimizer.param_groups if g["orthogonal"]]
    assert {id(p) for p in filters["params"]} == {id(p) for p in model.parameters() if p.ndim == 4}
    assert filters["lr_ratio"] == pytest.approx(0.25)
    others = [p for g in optimizer.param_groups if not g["orthogonal"] for p in g["params"]]
    assert len(others) + len(filters["params"]) == len(list(model.parameters()))


def test_a_muon_run_learns_and_resumes_its_momentum(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=3, optimizer="muon", lr=0.05, muon_lr=0.05))
    assert summary["test_acc"] > 0.2
    state = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]
    assert all("momentum_buffer" in s for s in state["state"].values())


def test_filter_banks_of_one_shape_are_orthogonalised_together_as_each_would_be_alone():
    generator = torch.Generator().manual_seed(2)
    stack = torch.randn(5, 16, 144, generator=generator, dtype=torch.float64)
    together = orthogonalize(stack)
    assert all(torch.allclose(together[i], orthogonalize(stack[i]), rtol=0, atol=1e-12) for i in range(5))
    assert torch.allclose(orthogonalize(stack.mT), together.mT, rtol=0, atol=1e-12)  # tall ones too

    def banks() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(3)
        shapes = [(8, 4, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (8, 8, 3, 3)]
        return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]

    shared, alone = banks(), banks()
    one = MuonSGD([{"params": shared, "orthogonal": True}], lr=0.1, momentum=0.9, batch_banks=True)
    each = [MuonSGD([{"params": [p], "orthogonal": True}], lr=0.1, momentum=0.9, batch_banks=False) for p in alone]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        for a, b in zip(shared, alone, strict=True):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        one.step()
        for optimizer in each:
            optimizer.step()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(shared, alone, strict=True))
