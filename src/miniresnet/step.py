"""The training step as one fixed piece of work, so that a GPU can record it once as a CUDA graph
and replay it for every batch.

On a GPU the eager step is launch-bound: a small network's forward, backward and optimizer are
hundreds of tiny kernels, each launched from Python. A CUDA graph records them once and replays
them with a single launch. What that takes, and what GraphStep provides:
- static buffers: each batch is copied into the input tensors the graph was recorded with;
- the learning rates as device tensors in the optimizer's groups, written before each step (a
  Python float would be recorded once and never change);
- the optimizer's state created before recording, by a few warm-up steps after which the weights,
  BatchNorm statistics and optimizer state are put back as they were: no step is taken twice;
- one graph per image size (progressive resizing changes it), for full batches; an epoch's last,
  partial batch takes the same step eagerly.
With `capture=False` (a CPU) the same step runs eagerly, which is how the tests check, in float64,
that it computes what the ordinary step in `train.train_steps` does.
"""

from __future__ import annotations

import contextlib

import torch

from .loss import TrainingLoss
from .runtime import Precision

# Eager steps on a side stream before recording: cuDNN picks its kernels and the optimizer creates
# its state in them, neither of which may happen inside a recording.
WARMUP_STEPS = 3


class GraphStep:
    """Forward, loss, backward and optimizer step on (x, y); `__call__` returns the loss and logits
    (on a GPU, the graph's own output tensors: read or copy them before the next step)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: Precision,
        loss_fn: TrainingLoss = TrainingLoss(),
        batch_size: int,
        capture: bool,
    ) -> None:
        if precision.name == "fp16":
            raise ValueError("fp16's loss scaler reads the gradients back every step: it cannot be recorded")
        self.model, self.optimizer, self.precision = model, optimizer, precision
        self.loss_fn, self.batch_size, self.capture = loss_fn, batch_size, capture
        weight = next(model.parameters())
        # float32 (float64 for numerical checks) even when the weights are bf16: fused optimizers read
        # a float32 lr, and a bf16 one would round every lr to 8 bits.
        lr_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=lr_dtype, device=weight.device)
            if capture and "capturable" in group:  # Adam keeps its step count on the device
                group["capturable"] = True
        self.recorded: dict[tuple, tuple] = {}  # batch shape -> (graph, x, y, loss, logits)

    def set_lr(self, lr: float, body_lr_scale: float = 1.0) -> None:
        """The lr of the next steps: `lr`, times `body_lr_scale` for the groups fine-tuning marks as
        the body. Written into the device tensors the optimizer reads (no wait for the device)."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * body_lr_scale if group.get("body") else lr)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, teacher_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on (x, y); a teacher (if the loss has one) sees `teacher_x`, by default x."""
        if not self.capture or len(x) != self.batch_size:
            self.optimizer.zero_grad(set_to_none=True)
            return self.compute(x, y, teacher_x)
        key = (tuple(x.shape), x.stride(), teacher_x is None)
        if key not in self.recorded:
            self.recorded[key] = self.record(x, y, teacher_x)
        graph, inputs, loss, logits = self.recorded[key]
        given = tuple(t for t in (x, y, teacher_x) if t is not None)
        for static, batch in zip(inputs, given, strict=True):
            static.copy_(batch)
        graph.replay()
        return loss, logits

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, teacher_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself; the gradients must be None (or zero) before it."""
        # No autocast cache: a cast cached while recording would go stale as the weights change.
        autocast = self.precision.autocast
        cast = torch.autocast(x.device.type, autocast, cache_enabled=False) if autocast else contextlib.nullcontext()
        with cast:
            logits = self.model(x)
            loss = self.loss_fn(logits, x if teacher_x is None else teacher_x, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def record(self, x: torch.Tensor, y: torch.Tensor, teacher_x: torch.Tensor | None) -> tuple:
        """Warm up, put everything back, and record the step for batches shaped like (x, y)."""
        inputs = tuple(t.clone() for t in (x, y, teacher_x) if t is not None)  # the graph's own input tensors
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self.compute(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward writes fresh gradients
        with torch.cuda.graph(graph):
            loss, logits = self.compute(*inputs)
        # Recording ran nothing: the first real step is this batch's replay (by the caller).
        return graph, inputs, loss, logits

    def _snapshot(self) -> dict:
        """Copies of everything a step changes: weights, BatchNorm statistics and optimizer state."""
        tensors = dict(self.model.state_dict(keep_vars=True))
        for index, state in enumerate(self.optimizer.state.values()):
            tensors |= {f"optimizer.{index}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return {"tensors": tensors, "copies": {k: v.detach().clone() for k, v in tensors.items()}}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        """Back to the snapshot, in place (the graph records these tensors' addresses). Optimizer
        state the warm-up created is zeroed: a zero momentum (or Adam moment, or step count) is
        exactly what a first step starts from."""
        for name, tensor in saved["tensors"].items():
            tensor.detach().copy_(saved["copies"][name])
        known = {id(t) for t in saved["tensors"].values()}
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in known:
                    value.zero_()
