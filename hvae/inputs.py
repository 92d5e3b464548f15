"""Input checks of the model's public calls: shapes, raw counts, batch indices, each error naming
the row, gene or value and what the model expects."""

from __future__ import annotations

import math

import torch

from .config import HVAEConfig


def check_counts(config: HVAEConfig, counts: torch.Tensor, check_values: bool) -> None:
    """A (cells, n_genes) tensor; with ``check_values`` raw non-negative integer counts (a host read)."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be a 2-D (cells, genes) tensor, got shape {tuple(counts.shape)}")
    if counts.shape[1] != config.n_genes:
        raise ValueError(
            f"counts have {counts.shape[1]} genes but the model was built for "
            f"{config.n_genes} (HVAEConfig.n_genes); align the data to the model's gene list"
        )
    if check_values:
        check_count_values(counts)


def check_batch_index(
    config: HVAEConfig, batch_index: torch.Tensor | None, n_cells: int, check_values: bool
) -> torch.Tensor | None:
    """The batch index as a (cells,) long tensor: required iff the model has batches; with
    ``check_values`` every entry in range (a host read)."""
    if config.n_batches == 0:
        if batch_index is not None:
            raise ValueError("batch_index was given but the model has n_batches=0 (no batch covariate)")
        return None
    if batch_index is None:
        raise ValueError(f"the model was built with n_batches={config.n_batches}: pass batch_index")
    if batch_index.dim() == 2 and batch_index.shape[1] == 1:
        batch_index = batch_index[:, 0]
    if batch_index.dim() != 1 or batch_index.shape[0] != n_cells:
        raise ValueError(f"batch_index must have shape ({n_cells},), got {tuple(batch_index.shape)}")
    if batch_index.is_floating_point() or batch_index.dtype == torch.bool:
        raise ValueError(f"batch_index must hold integers, got dtype {batch_index.dtype}")
    if check_values:
        bad = (batch_index < 0) | (batch_index >= config.n_batches)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"batch_index[{row}] = {int(batch_index[row])} is out of range: the model has "
                f"n_batches={config.n_batches} (valid 0..{config.n_batches - 1})"
            )
    return batch_index.long()


def check_count_values(counts: torch.Tensor) -> None:
    """Raise a ValueError naming the first bad entry (row, gene) of a counts matrix."""
    values = counts if counts.is_floating_point() else counts.float()
    bad = ~torch.isfinite(values) | (values < 0) | (values != torch.round(values))
    if not bool(bad.any()):
        return
    row, gene = (int(i) for i in bad.nonzero()[0])
    value = float(values[row, gene])
    if math.isnan(value):
        kind = "NaN"
    elif math.isinf(value):
        kind = "infinite"
    elif value < 0:
        kind = "negative"
    else:
        kind = "not an integer"
    raise ValueError(
        f"counts[{row}, {gene}] = {value!r} is {kind}: the model needs raw non-negative integer "
        f"counts (not normalised or log-transformed values); {int(bad.sum())} bad entries in this batch"
    )
