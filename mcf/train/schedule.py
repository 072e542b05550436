"""Learning-rate and momentum schedules, as pure functions of the optimizer step.

Keeping them stateless means a resumed run needs only the step number to continue the exact curve
(no scheduler object to save), and the tests can check the formula at any step.
"""

from __future__ import annotations

import math

import torch


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule: ``lr = blr × effective_batch / 256`` (MAE, MCF)."""
    return blr * effective_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: float, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then a half-cosine down to ``min_lr``.

    ``step`` is the 0-based index of the optimizer step about to be taken; the curve is set per
    iteration, as in the release (not per epoch), and ``warmup_steps`` may be fractional, as the release's
    warm-up epochs times steps per epoch is.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (all groups share it; only weight decay differs)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
