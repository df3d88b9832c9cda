import torch
from torch import nn

from miniresnet.ema import EMA


def test_ema_is_the_ramped_average_of_the_weights_and_copies_the_counters():
    """Checked against the same average computed in float64, so the tolerance is float32's
    rounding of a few dozen lerps on any CPU; integer buffers (BatchNorm's batch count) are copied."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.9)
    expected = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    for n in range(1, 31):
        net(torch.randn(8, 4))  # moves the running statistics and the batch count
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.9, (1 + n) / (10 + n))
        for key in expected:
            expected[key] = decay * expected[key] + (1 - decay) * net.state_dict()[key].double()
    averaged = ema.model.state_dict()
    for key, value in expected.items():
        assert (averaged[key].double() - value).abs().max() <= 1e-5 * value.abs().max(), key
    assert averaged["1.num_batches_tracked"] == net.state_dict()["1.num_batches_tracked"] == 30
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
