"""Gene modules for the coarse levels, built from a sample of the data.

A level given a gene partition (``HVAEConfig.gene_modules``) decodes each cell's counts pooled
over its modules: a coarse target, so that level can only hold what moves whole programmes of
genes. ``HVAEConfig.module_levels`` says how to build them, ``(modules, components)`` per coarse
level from the top down: each partition is a k-means of the genes' loadings on the first
``components`` principal components of standardised log expression. Few modules on few components
for the top (the programmes that tell lineages apart), more on more for the level below.

    config = fit_gene_modules(HVAEConfig(n_genes=2000), counts)   # counts: a sample of cells
    model = HierarchicalVAE(config)

The pipeline calls ``GeneCovariance`` over up to 20,000 cells read out of core, then
``gene_modules`` on it; the result is saved with the model (it is part of the config).
"""

from __future__ import annotations

import dataclasses

import torch

from .config import HVAEConfig

SAMPLE_CELLS = 20_000  # cells enough for the leading components of 2,000 genes


class GeneCovariance:
    """Moments of each gene's log expression (``log1p(counts / library * target_sum)``),
    accumulated block by block in float64; ``covariance()`` gives the standardised genes'
    covariance (their correlation)."""

    def __init__(self, n_genes: int, target_sum: float = 1e4) -> None:
        self.n, self.target_sum = 0, target_sum
        self.total = torch.zeros(n_genes, dtype=torch.float64)
        self.cross = torch.zeros(n_genes, n_genes, dtype=torch.float64)

    def update(self, counts: torch.Tensor) -> None:
        """Add a dense (cells, genes) block of raw counts."""
        counts = counts.to(torch.float64)
        if counts.dim() != 2 or counts.shape[1] != self.total.shape[0]:
            raise ValueError(f"counts must be (cells, {self.total.shape[0]}), got {tuple(counts.shape)}")
        library = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        x = torch.log1p(counts / library * self.target_sum)
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


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 4,
            iterations: int = 300) -> torch.Tensor:
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


def gene_modules(covariance: torch.Tensor, module_levels, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """One partition per ``(modules, components)`` of ``module_levels`` (the top first): k-means of
    the genes' loadings on the leading components of ``covariance``; module numbers 0..K-1, in
    order of first appearance."""
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    order = values.argsort(descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    generator = torch.Generator().manual_seed(seed)
    partitions = []
    for k, components in module_levels:
        loadings = vectors[:, :components] * values[:components].sqrt()
        labels = _kmeans(loadings, int(k), generator).tolist()
        renumber: dict[int, int] = {}
        partitions.append(tuple(renumber.setdefault(m, len(renumber)) for m in labels))
    return tuple(partitions)


def fit_gene_modules(config: HVAEConfig, counts: torch.Tensor, seed: int = 0) -> HVAEConfig:
    """``config`` with ``gene_modules`` built from ``counts`` (a dense sample of cells x genes) as
    ``config.module_levels`` asks; ``config`` unchanged when it asks for none or has them already."""
    if not config.module_levels or config.gene_modules:
        return config
    moments = GeneCovariance(config.n_genes, config.input_target_sum)
    for start in range(0, min(counts.shape[0], SAMPLE_CELLS), 4096):
        block = counts[start:min(start + 4096, SAMPLE_CELLS)]
        moments.update(torch.as_tensor(block.toarray() if hasattr(block, "toarray") else block))
    return dataclasses.replace(config, gene_modules=gene_modules(moments.covariance(), config.module_levels, seed))
