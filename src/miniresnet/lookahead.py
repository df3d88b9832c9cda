"""Lookahead (Zhang et al., 2019): the optimizer takes its steps as usual, and every few steps a
slow copy of the weights moves part of the way toward where those steps led, and training restarts
from the slow copy. It damps the noise of a high learning rate at the cost of one copy of the weights."""

from __future__ import annotations

import torch


class Lookahead:
    """Wraps an optimizer and shares its param_groups (so the loop's lr reaches it). After every
    `every` steps the slow weights move `alpha` of the way to the trained ones, which are then set
    to them. Its state_dict holds the wrapped optimizer's, the slow weights and the step count, so
    a resumed run continues exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int, alpha: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"Lookahead needs every >= 1 steps, got {every}")
        self.optimizer, self.every, self.alpha = optimizer, every, alpha
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.every == 0:
            torch._foreach_lerp_(self.slow, self.params, self.alpha)
            torch._foreach_copy_(self.params, self.slow)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "slow": list(self.slow), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for mine, saved in zip(self.slow, state["slow"], strict=True):
            mine.copy_(saved)
        self.steps = state["steps"]
