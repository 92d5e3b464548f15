"""Highly variable genes from streamed blocks (one pass of per-gene sums).

Seurat's dispersion method on log-normalised counts: per gene mean and variance, log
dispersion z-scored within 20 bins of mean expression, top N by z-score. It needs only
per-gene sums, so it runs over blocks of any source in constant memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from .normalize import log_normalize


class GeneStatistics:
    """Accumulates per-gene sums of log-normalised counts over CSR blocks."""

    def __init__(self, n_genes: int) -> None:
        self.n_genes = n_genes
        self.n_cells = 0
        self.total = np.zeros(n_genes, dtype=np.float64)
        self.total_sq = np.zeros(n_genes, dtype=np.float64)
        self.n_expressed = np.zeros(n_genes, dtype=np.int64)

    def update(self, counts: sp.csr_matrix) -> None:
        if counts.shape[1] != self.n_genes:
            raise ValueError(f"block has {counts.shape[1]} genes, expected {self.n_genes}")
        normalized = log_normalize(counts).astype(np.float64)  # sums over millions of cells
        self.n_cells += counts.shape[0]
        self.total += np.asarray(normalized.sum(axis=0)).ravel()
        self.total_sq += np.asarray(normalized.multiply(normalized).sum(axis=0)).ravel()
        self.n_expressed += np.bincount(sp.csr_matrix(counts).indices, minlength=self.n_genes)

    def merge(self, other: "GeneStatistics") -> "GeneStatistics":
        """Add another part's sums (the HVG pass split over workers); returns self."""
        if other.n_genes != self.n_genes:
            raise ValueError(f"statistics of {other.n_genes} genes cannot join {self.n_genes}")
        self.n_cells += other.n_cells
        self.total += other.total
        self.total_sq += other.total_sq
        self.n_expressed += other.n_expressed
        return self

    def highly_variable(self, n_top: int, n_bins: int = 20, min_cells: int = 3, min_mean: float = 0.0125) -> np.ndarray:
        """Indices (sorted) of the ``n_top`` most variable genes.

        Genes detected in fewer than ``min_cells`` cells or with a mean log-normalised
        expression below ``min_mean`` (scanpy's seurat-flavour floor) are not eligible: their
        dispersion is dominated by a handful of counts.
        """
        z = self.dispersion_scores(n_bins, min_cells, min_mean)
        eligible = int(np.isfinite(z).sum())
        if eligible < n_top:
            raise ValueError(
                f"only {eligible} genes are expressed in >= {min_cells} cells with mean >= {min_mean}; "
                f"cannot pick {n_top} highly variable genes"
            )
        return np.sort(np.argsort(-z, kind="stable")[:n_top])

    def dispersion_scores(self, n_bins: int = 20, min_cells: int = 3, min_mean: float = 0.0125) -> np.ndarray:
        """Normalised log dispersion per gene (z-score within mean-expression bins); -inf if not eligible."""
        if self.n_cells < 2:
            raise ValueError("highly variable genes need at least 2 cells")
        mean = self.total / self.n_cells
        variance = np.maximum(self.total_sq / self.n_cells - mean**2, 0) * self.n_cells / (self.n_cells - 1)
        eligible = (self.n_expressed >= min_cells) & (mean >= min_mean)
        z = np.full(self.n_genes, -np.inf)
        if not eligible.any():
            return z
        dispersion = np.log(np.maximum(variance, 1e-12) / np.maximum(mean, 1e-12))
        edges = np.quantile(mean[eligible], np.linspace(0, 1, n_bins + 1))
        bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, n_bins - 1)
        for b in range(n_bins):
            members = eligible & (bins == b)
            if members.sum() == 0:
                continue
            values = dispersion[members]
            spread = values.std()
            z[members] = (values - values.mean()) / spread if spread > 0 else 0.0
        return z


def highly_variable_by_batch(statistics: dict[str, GeneStatistics], n_top: int) -> np.ndarray:
    """scanpy's ``batch_key`` rule: rank genes by the number of batches in which they are among
    the top ``n_top``, ties broken by the mean normalised dispersion over batches."""
    if not statistics:
        raise ValueError("no batches to select highly variable genes from")
    scores = []
    for name, stats in statistics.items():
        if stats.n_cells < 2:
            continue  # a batch of one cell has no variance
        scores.append(stats.dispersion_scores())
    if not scores:
        raise ValueError("every batch has fewer than 2 cells")
    z = np.vstack(scores)
    top = np.zeros_like(z, dtype=bool)
    for row, values in enumerate(z):
        finite = np.flatnonzero(np.isfinite(values))
        top[row, finite[np.argsort(-values[finite], kind="stable")[:n_top]]] = True
    n_batches_top = top.sum(axis=0)
    finite_z = np.where(np.isfinite(z), z, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # genes eligible in no batch: mean of nothing
        mean_z = np.nan_to_num(np.nanmean(finite_z, axis=0), nan=-np.inf)
    eligible = np.isfinite(finite_z).any(axis=0)
    if eligible.sum() < n_top:
        raise ValueError(f"only {int(eligible.sum())} genes are eligible in any batch; cannot pick {n_top}")
    order = np.lexsort((-mean_z, -n_batches_top))
    return np.sort(order[:n_top])
