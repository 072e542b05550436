"""Exponential moving average of model weights: fine-tuned models are evaluated with the EMA copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema ← d·ema + (1 − d)·weights`` after each optimiser step; integer buffers are copied.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` at update ``n``, so a short run
    (a few hundred steps, as on the CPU) is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(new.detach(), 1.0 - d)
            else:
                avg.copy_(new)
        self.updates += 1
