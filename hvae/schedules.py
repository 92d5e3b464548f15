"""KL schedules: step-based warm-up and NVAE-style balancing across levels."""

from __future__ import annotations

import torch


def kl_warmup(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """Linear KL weight from ``start`` at step 0 to 1.0 at ``warmup_steps`` (then 1.0).

    Step-based, not epoch-based, so it behaves the same for any dataset size or world size.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start}")
    if warmup_steps == 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * max(step, 0) / warmup_steps


def balanced_kl_coefficients(kl: torch.Tensor, level_sizes: torch.Tensor) -> torch.Tensor:
    """Per-level KL coefficients that equalise usage during warm-up (NVAE's KL balancing).

    A level that already carries a lot of KL *per latent dimension* is penalised more, one
    carrying little is penalised less, so every level is pulled into use before the full
    KL applies. Coefficients are proportional to ``kl_l / size_l`` and average to 1.

    Args:
        kl: (n_levels,) detached mean KL per level.
        level_sizes: (n_levels,) latent dimension of each level.
    """
    weights = kl.clamp(min=1e-2) / level_sizes
    return weights / weights.sum() * kl.numel()
