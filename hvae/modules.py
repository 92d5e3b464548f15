"""Gene modules for the coarse levels, built from a sample of the data.

A level given a gene partition (``HVAEConfig.gene_modules``) decodes each cell's counts pooled
over its modules: a coarse target, so that level can only hold what moves whole programmes of
genes. ``HVAEConfig.module_levels`` says how to build them, ``(modules, components)`` per coarse
level from the top down: each partition is a k-means of the genes' loadings on the first
``components`` principal components of standardised log expression. Few modules on few components
for the top (the programmes that tell lineages apart), more on more for the level below.

    config = fit_gene_modules(HVAEConfig(n_genes=2000), counts)   # counts: a sample of cells
    model = HierarchicalVAE(config)

``fit_gene_modules`` reads up to 20,000 cells of the sample. Up to 4,096 genes it accumulates the
genes' correlation matrix block by block (``GeneCovariance``) and takes its eigenvectors; above, where
a genes x genes matrix would not fit (32,738 genes: 8.6 GB), it finds the leading components by a
randomized SVD of the standardised cells (``leading_components``), a few passes over the sample in
blocks, never holding more than one dense block. The result is saved with the model (it is part of
the config).
"""

from __future__ import annotations

import dataclasses

import torch

from .config import HVAEConfig

SAMPLE_CELLS = 20_000  # cells enough for the leading components of 2,000 genes
EXACT_GENES = 4_096  # up to this many genes the correlation matrix is built whole
BLOCK_VALUES = 2**25  # values in one dense block of cells x genes (128 MB in float32)


class GeneCovariance:
    """Moments of each gene's log expression (``log1p(counts / library * target_sum)``),
    accumulated block by block in float64; ``covariance()`` gives the standardised genes'
    covariance (their correlation)."""

    def __init__(self, n_genes: int, target_sum: float = 1e4) -> None:
        self.n, self.target_sum = 0, target_sum
        self.total = torch.zeros(n_genes, dtype=torch.float64)
        self.cross = torch.zeros(n_genes, n_genes, dtype=torch.float64)

    def update(self, counts) -> None:
        """Add a (cells, genes) block of raw counts (a tensor or a scipy sparse matrix)."""
        if len(counts.shape) != 2 or counts.shape[1] != self.total.shape[0]:
            raise ValueError(f"counts must be (cells, {self.total.shape[0]}), got {tuple(counts.shape)}")
        x = _log_expression(counts, self.target_sum)
        self.n += x.shape[0]
        self.total += x.sum(dim=0)
        self.cross += x.T @ x

    def covariance(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError(f"gene modules need at least 2 cells, got {self.n}")
        mean = self.total / self.n
        cov = self.cross / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt() + 1e-6
        return cov / torch.outer(std, std)


def _kmeans(
    points: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 4, iterations: int = 300
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ starts; the labels of the best of ``restarts`` runs."""
    n = points.shape[0]
    k = min(k, n)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = points[torch.randint(n, (1,), generator=generator)]
        for _ in range(1, k):  # k-means++: the next centre drawn by squared distance
            d2 = torch.cdist(points, centres).min(dim=1).values.square()
            weights = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
        labels = None
        for _ in range(iterations):
            new = torch.cdist(points, centres).argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = points[labels == c]
                if len(members):
                    centres[c] = members.mean(dim=0)
        inertia = (points - centres[labels]).square().sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def _log_expression(block, target_sum: float) -> torch.Tensor:
    """A dense float64 (cells, genes) block of ``log1p(counts / library * target_sum)``."""
    counts = torch.as_tensor(block.toarray() if hasattr(block, "toarray") else block).to(torch.float64)
    library = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.log1p(counts / library * target_sum)


def leading_components(
    counts, n_components: int, target_sum: float = 1e4, seed: int = 0, power_iterations: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns) of the genes' correlation matrix, the ``n_components``
    largest, from a randomized SVD (Halko et al. 2011, with power iterations) of the standardised
    log expression of ``counts`` (cells x genes, dense or scipy sparse), read in blocks: the
    correlation matrix itself is never built."""
    n_cells, n_genes = counts.shape
    step = max(1, BLOCK_VALUES // max(n_genes, 1))
    starts = range(0, n_cells, step)

    def blocks():
        for start in starts:
            yield start, _log_expression(counts[start : min(start + step, n_cells)], target_sum)

    total, squares = torch.zeros(n_genes, dtype=torch.float64), torch.zeros(n_genes, dtype=torch.float64)
    for _, x in blocks():
        total += x.sum(dim=0)
        squares += x.square().sum(dim=0)
    mean = total / n_cells
    std = (squares / n_cells - mean.square()).clamp_min(0).sqrt() + 1e-6
    scale = std * n_cells**0.5  # z = (x - mean) / scale: z.T @ z is the correlation matrix

    def right(basis: torch.Tensor) -> torch.Tensor:  # z.T @ basis, (genes, q)
        out = torch.zeros(n_genes, basis.shape[1], dtype=torch.float64)
        for start, x in blocks():
            out += ((x - mean) / scale).T @ basis[start : start + x.shape[0]]
        return out

    def left(basis: torch.Tensor) -> torch.Tensor:  # z @ basis, (cells, q)
        return torch.cat([((x - mean) / scale) @ basis for _, x in blocks()])

    q = min(2 * n_components + 10, n_genes, n_cells)
    generator = torch.Generator().manual_seed(seed)
    cells_basis = torch.linalg.qr(left(torch.randn(n_genes, q, generator=generator, dtype=torch.float64))).Q
    for _ in range(power_iterations):
        genes_basis = torch.linalg.qr(right(cells_basis)).Q
        cells_basis = torch.linalg.qr(left(genes_basis)).Q
    _, singular, vh = torch.linalg.svd(right(cells_basis).T, full_matrices=False)  # (q, genes) = basis.T @ z
    return singular[:n_components].square(), vh[:n_components].T


def exact_components(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns) of ``covariance``, largest first."""
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def gene_modules(
    components: tuple[torch.Tensor, torch.Tensor], module_levels, seed: int = 0
) -> tuple[tuple[int, ...], ...]:
    """One partition per ``(modules, components)`` of ``module_levels`` (the top first): k-means of
    the genes' loadings on the leading ``components`` of their correlation (eigenvalues and
    eigenvectors, largest first: ``exact_components`` or ``leading_components``); module numbers
    0..K-1, in order of first appearance."""
    values, vectors = components[0].clamp_min(0), components[1]
    generator = torch.Generator().manual_seed(seed)
    partitions = []
    for k, n_components in module_levels:
        loadings = vectors[:, :n_components] * values[:n_components].sqrt()
        labels = _kmeans(loadings, int(k), generator).tolist()
        renumber: dict[int, int] = {}
        partitions.append(tuple(renumber.setdefault(m, len(renumber)) for m in labels))
    return tuple(partitions)


def fit_gene_modules(config: HVAEConfig, counts, seed: int = 0) -> HVAEConfig:
    """``config`` with ``gene_modules`` built from ``counts`` (a sample of cells x genes: a tensor or
    a scipy sparse matrix; its first 20,000 cells are read) as ``config.module_levels`` asks;
    ``config`` unchanged when it asks for none or has them already."""
    if not config.module_levels or config.gene_modules:
        return config
    with torch.profiler.record_function("hvae.fit_gene_modules"):  # set-up, once: profiles tell it from the steps
        return dataclasses.replace(config, gene_modules=_partitions(config, counts[:SAMPLE_CELLS], seed))


def _partitions(config: HVAEConfig, sample, seed: int) -> tuple[tuple[int, ...], ...]:
    if config.n_genes <= EXACT_GENES:
        moments = GeneCovariance(config.n_genes, config.input_target_sum)
        for start in range(0, sample.shape[0], 4096):
            moments.update(sample[start : start + 4096])
        return gene_modules(exact_components(moments.covariance()), config.module_levels, seed)
    most = max(components for _, components in config.module_levels)
    return gene_modules(leading_components(sample, most, config.input_target_sum, seed), config.module_levels, seed)
