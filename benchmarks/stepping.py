"""One training step as catdog's fit() takes it, with the clock read between its stages: shared by the profiles."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def timed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               bf16: bool) -> tuple[float, float, float]:
    """Forward (bf16 autocast if asked), BCE on logits, backward, optimiser step; the perf_counter() readings at the
    end of the forward pass, of the backward pass and of the step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x).float().squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    forward_end = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    backward_end = time.perf_counter()
    opt.step()
    return forward_end, backward_end, time.perf_counter()
