"""An exponential moving average (EMA) of a model's weights: a smoother model than the last step's,
which is what gets evaluated and saved when the `ema` option is on."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `model` = an averaged copy of the trained model, updated after every optimizer step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n updates, so the average
    is not dominated by the random initial weights in a short run. BatchNorm running statistics are
    averaged like the weights; the integer batch counters are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        ours, theirs = self.model.state_dict(), model.state_dict()
        self._floats = [(ours[k], theirs[k]) for k in ours if ours[k].is_floating_point()]
        self._others = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = zip(*self._floats, strict=True)
        torch._foreach_lerp_(list(averaged), list(current), 1 - decay)
        for mine, theirs in self._others:
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
