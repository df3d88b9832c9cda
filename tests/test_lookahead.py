import pytest
import torch

from miniresnet.config import TrainConfig
from miniresnet.lookahead import Lookahead
from miniresnet.model import MiniResNet
from miniresnet.train import build_optimizer


def test_every_k_steps_the_weights_restart_from_halfway_between_the_slow_and_the_trained_ones():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = Lookahead(torch.optim.SGD([weight], lr=0.1), every=3, alpha=0.5)
    gradients = [torch.tensor(g, dtype=torch.float64) for g in ([1.0, 2.0], [-3.0, 0.5], [2.0, 2.0], [1.0, 1.0])]
    expected, slow = weight.detach().clone(), weight.detach().clone()
    for step, gradient in enumerate(gradients, start=1):
        weight.grad = gradient
        optimizer.step()
        expected -= 0.1 * gradient
        if step == 3:  # slow moves halfway to the trained weights; training restarts there
            slow += 0.5 * (expected - slow)
            expected = slow.clone()
        assert torch.allclose(weight.detach(), expected, rtol=0, atol=1e-15), step
    assert optimizer.steps == 4 and torch.allclose(optimizer.slow[0], slow, rtol=0, atol=1e-15)


def test_its_state_round_trips_and_the_loop_sets_the_wrapped_optimizers_lr():
    model = MiniResNet()
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.4, momentum=0.9, lookahead=5))
    assert isinstance(optimizer, Lookahead) and optimizer.param_groups is optimizer.optimizer.param_groups
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    fresh = build_optimizer(MiniResNet(), TrainConfig(optimizer="sgd", lr=0.4, momentum=0.9, lookahead=5))
    fresh.load_state_dict(state)
    assert fresh.steps == 1 and all(torch.equal(a, b) for a, b in zip(fresh.slow, optimizer.slow, strict=True))
    assert fresh.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    assert not isinstance(build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.4)), Lookahead)
    with pytest.raises(ValueError, match="every"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), every=0)
