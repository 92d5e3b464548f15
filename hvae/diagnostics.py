"""Collapse diagnostics."""

from __future__ import annotations

import torch


def active_units(level_means: list[torch.Tensor], threshold: float = 0.01) -> list[int]:
    """Number of active units per level: dimensions with Cov_x(E_q[z]) > ``threshold``.

    Args:
        level_means: per level, the (cells, dim) posterior means of one set of cells, as
            returned by ``HierarchicalVAE.encode`` (level 0 first). Use a few thousand cells.
    Returns:
        One count per level, level 0 first (Burda et al. 2016's activity statistic).
    """
    counts = []
    for means in level_means:
        if means.shape[0] < 2:
            raise ValueError("active_units needs the posterior means of at least 2 cells")
        variance = means.double().var(dim=0)
        counts.append(int((variance > threshold).sum()))
    return counts
