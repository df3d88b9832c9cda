"""Muon for convolution filters: Nesterov momentum whose update is orthogonalised before it is
applied (Jordan et al., 2024), beside plain Nesterov SGD for every other parameter.

Every convolution here is followed by BatchNorm, so a filter bank's scale does not change what
the network computes. Each bank is therefore kept at a fixed norm (sqrt of its output channels,
unit filters on average), and its lr is the size of a step relative to that norm.
"""

from __future__ import annotations

import torch

# The quintic Newton-Schulz iteration's coefficients from the Muon paper: five steps take a
# matrix's singular values from (0, 1] to roughly [0.7, 1.2], which is close enough to 1.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `matrix` (its singular values set to ~1), or to each
    matrix of a stack (..., m, n) at once: a few batched matmuls, however many there are. In
    float32 (float64 stays float64, for numerical checks)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix if matrix.dtype == torch.float64 else matrix.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True) if x.ndim > 2 else x.norm()  # one matrix: as it always was
    x = x / (norm + 1e-7)  # singular values into (0, 1]
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrix.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with `orthogonal=True` hold 4-D convolution filters and take Muon steps; the others
    take Nesterov SGD steps with their weight decay. A group's step size is its `lr` (which the
    training loop sets every step) times its `lr_ratio`, so one schedule drives both."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, batch_banks: bool | None = None) -> None:
        for group in groups:
            if group.get("orthogonal") and any(p.ndim != 4 for p in group["params"]):
                raise ValueError("orthogonal groups hold convolution filters (4-D) only")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=0.0, orthogonal=False, lr_ratio=1.0)
        super().__init__(groups, defaults)
        self.batch_banks = batch_banks  # None: batched on a GPU only (see banks_of_one_shape)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"] * group["lr_ratio"], group["momentum"]
            filters = []  # (filter bank, its Nesterov update) of an orthogonal group
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not group["orthogonal"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"].mul_(momentum).add_(grad)
                update = grad.add(buffer, alpha=momentum)  # Nesterov
                if group["orthogonal"]:
                    filters.append((p, update))
                else:
                    step_by(p, update, lr)
            # Banks of one shape orthogonalised together on a GPU: a few kernels, not one per bank.
            for banks in banks_of_one_shape(filters, self.batch_banks):
                matrices = [u.reshape(len(p), -1) for p, u in banks]
                updates = orthogonalize(torch.stack(matrices)) if len(banks) > 1 else [orthogonalize(matrices[0])]
                for (p, _), update in zip(banks, updates, strict=True):
                    norm = len(p) ** 0.5
                    p.mul_(norm / p.norm().clamp_min(1e-12))
                    step_by(p, update.view_as(p), lr * norm / min(update.shape) ** 0.5)
        return None


def step_by(p: torch.Tensor, update: torch.Tensor, size: float | torch.Tensor) -> None:
    """p -= size * update. `size` is a float, or a device tensor when the lr is one (a recorded CUDA
    graph reads the tensor's value at each replay; a float would stay the one it was recorded with)."""
    if isinstance(size, torch.Tensor):
        p.sub_(update * size)
    else:
        p.add_(update, alpha=-size)


def banks_of_one_shape(filters: list[tuple[torch.Tensor, torch.Tensor]], together: bool | None) -> list[list[tuple]]:
    """The (filter bank, update) pairs grouped by the bank's shape, in their first appearance's
    order, when `together` (None: on a GPU, where each kernel launch costs more than its
    arithmetic); else each bank alone, as on a CPU, where stacking measured slower
    (benchmarks/RESULTS.md). Both compute the same."""
    if together is None:
        together = bool(filters) and filters[0][0].device.type == "cuda"
    if not together:
        return [[pair] for pair in filters]
    groups: dict[tuple, list] = {}
    for p, update in filters:
        groups.setdefault(tuple(p.shape), []).append((p, update))
    return list(groups.values())
