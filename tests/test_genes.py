"""Highly variable genes from streamed blocks."""

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.data.genes import GeneStatistics


def planted_counts(seed=0):
    """60 genes with Poisson(2) noise; genes 7, 21, 40 have the same mean but are bimodal
    (off in half the cells, Poisson(4) in the other half), as marker genes are."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(900, 60)).astype(np.float32)
    on = rng.random(900) < 0.5
    for gene in (7, 21, 40):
        counts[:, gene] = np.where(on, rng.poisson(4.0, size=900), 0)
    return sp.csr_matrix(counts)


def test_streamed_blocks_equal_one_pass_and_find_planted_genes():
    counts = planted_counts()
    whole = GeneStatistics(60)
    whole.update(counts)
    streamed = GeneStatistics(60)
    for start in range(0, 900, 250):
        streamed.update(counts[start : start + 250])
    np.testing.assert_allclose(streamed.total, whole.total, rtol=1e-6)
    np.testing.assert_allclose(streamed.total_sq, whole.total_sq, rtol=1e-6)
    assert list(streamed.highly_variable(3, n_bins=1)) == [7, 21, 40]


def test_errors_name_the_problem():
    stats = GeneStatistics(60)
    with pytest.raises(ValueError, match="at least 2 cells"):
        stats.highly_variable(3)
    with pytest.raises(ValueError, match="block has 59 genes, expected 60"):
        stats.update(planted_counts()[:, :59])
    stats.update(planted_counts())
    with pytest.raises(ValueError, match="cannot pick 100 highly variable genes"):
        stats.highly_variable(100)
