"""The synthetic atlas: determinism, hierarchy, realism, streamed writing in constant memory."""

import tracemalloc

import anndata as ad
import numpy as np
import pytest

from pipeline.data.synthetic import RNG_CHUNK, SyntheticAtlas, SyntheticAtlasSpec, write_synthetic_atlas

SMALL = SyntheticAtlasSpec(n_cells=3_000, n_genes=300, n_donors=5, block_size=1_000)


@pytest.fixture(scope="module")
def small_atlas():
    return SyntheticAtlas(SMALL).to_anndata()


def test_same_seed_same_cells_other_seed_other_cells(small_atlas):
    again = SyntheticAtlas(SMALL).to_anndata()
    assert (small_atlas.X != again.X).nnz == 0
    assert small_atlas.obs.equals(again.obs)
    other = SyntheticAtlas(SyntheticAtlasSpec(**{**SMALL.to_dict(), "seed": 1})).to_anndata()
    assert (small_atlas.X != other.X).nnz > 0


def test_cells_do_not_depend_on_block_size(small_atlas):
    regrouped = SyntheticAtlas(SyntheticAtlasSpec(**{**SMALL.to_dict(), "block_size": 777})).to_anndata()
    assert (small_atlas.X != regrouped.X).nnz == 0
    counts, obs = SyntheticAtlas(SMALL).rows(RNG_CHUNK - 5, RNG_CHUNK + 7)  # across a chunk edge
    assert (counts != small_atlas.X[RNG_CHUNK - 5 : RNG_CHUNK + 7]).nnz == 0
    assert list(obs.index) == list(small_atlas.obs.index[RNG_CHUNK - 5 : RNG_CHUNK + 7])


def test_labels_form_a_strict_three_level_tree(small_atlas):
    obs = small_atlas.obs
    assert list(obs.columns) == ["lineage", "cell_type", "subtype", "donor_id"]
    assert obs["subtype"].cat.categories.size == 27 and obs["lineage"].nunique() == 3
    # Every subtype has exactly one cell type and one lineage, and names encode the path.
    assert (obs.groupby("subtype", observed=True)["cell_type"].nunique() == 1).all()
    assert (obs.groupby("cell_type", observed=True)["lineage"].nunique() == 1).all()
    assert all(s.startswith(t + ".") for s, t in zip(obs["subtype"], obs["cell_type"], strict=True))


def test_counts_look_like_10x_umis(small_atlas):
    counts = small_atlas.X
    assert counts.dtype == np.float32
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() >= 1
    zero_fraction = 1 - counts.nnz / np.prod(counts.shape)
    assert 0.75 < zero_fraction < 0.97
    library = np.asarray(counts.sum(axis=1)).ravel()
    assert 0.4 * SMALL.n_genes < np.median(library) < 1.5 * SMALL.n_genes  # 0.75 UMI per gene on average
    assert library.std() / library.mean() > 0.3  # log-normal spread, not constant depth
    # Over-dispersion: variance exceeds the mean (Poisson) for most expressed genes.
    dense = counts.toarray()
    expressed = dense.mean(axis=0) > 0.5
    assert (dense.var(axis=0)[expressed] > 1.5 * dense.mean(axis=0)[expressed]).mean() > 0.9


def test_donors_are_contiguous_and_shift_expression(small_atlas):
    codes = small_atlas.obs["donor_id"].cat.codes.to_numpy()
    assert np.all(np.diff(codes) >= 0) and len(np.unique(codes)) == SMALL.n_donors
    shuffled = SyntheticAtlas(SyntheticAtlasSpec(**{**SMALL.to_dict(), "donor_contiguous": False}))
    _, obs = shuffled.block(0)
    assert np.any(np.diff(obs["donor_id"].cat.codes.to_numpy()) < 0)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_streamed_file_equals_in_memory_atlas(tmp_path, small_atlas, suffix):
    path = write_synthetic_atlas(SMALL, tmp_path / f"atlas{suffix}", progress=False)
    loaded = ad.read_h5ad(path) if suffix == ".h5ad" else ad.read_zarr(path)
    assert loaded.shape == small_atlas.shape
    assert (loaded.X != small_atlas.X).nnz == 0
    assert list(loaded.obs.index) == list(small_atlas.obs.index)
    for column in small_atlas.obs.columns:
        assert list(loaded.obs[column]) == list(small_atlas.obs[column])
    assert list(loaded.var["feature_id"]) == list(small_atlas.var["feature_id"])
    assert '"generator": "pipeline.data.synthetic"' in loaded.uns["provenance"]


def test_writing_memory_does_not_grow_with_cells(tmp_path):
    """Peak Python-heap memory for 4x the cells stays within 1.3x (blocks are the unit)."""
    peaks = []
    for n_cells in (8_192, 32_768):
        spec = SyntheticAtlasSpec(n_cells=n_cells, n_genes=200, n_donors=4, block_size=2_048)
        tracemalloc.start()
        write_synthetic_atlas(spec, tmp_path / f"atlas_{n_cells}.zarr", progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="effect_sd"):
        SyntheticAtlasSpec(branching=(2, 2), effect_sd=(1.0,), program_fraction=(0.1, 0.1))
    with pytest.raises(ValueError, match="branching"):
        SyntheticAtlasSpec(branching=(3, 0, 3))
    with pytest.raises(IndexError, match="out of range"):
        SyntheticAtlas(SMALL).block(99)


@pytest.mark.parametrize("theta", [0.5, 3.0, 12.0])
def test_sparse_nb_draw_has_the_nb_moments(theta):
    """negative_binomial_csr against the closed form: P(0), mean, variance within 5 standard errors."""
    from pipeline.data.synthetic import negative_binomial_csr

    means = np.array([0.01, 0.3, 2.0, 9.5, 10.5, 40.0, 400.0], np.float32)
    n = 60_000
    counts = (
        negative_binomial_csr(np.random.default_rng(7), np.tile(means, (n, 1)), np.full(len(means), theta, np.float32))
        .toarray()
        .astype(np.float64)
    )
    assert counts.min() >= 0 and np.array_equal(counts, np.round(counts))
    variance = means + means.astype(np.float64) ** 2 / theta
    p0 = (1 + means.astype(np.float64) / theta) ** -theta
    assert np.all(np.abs(counts.mean(0) - means) < 5 * np.sqrt(variance / n))
    assert np.all(np.abs((counts == 0).mean(0) - p0) < 5 * np.sqrt(p0 * (1 - p0) / n) + 1e-4)
    assert np.all(np.abs(counts.var(0) / variance - 1) < 0.12)


def test_counts_match_the_gamma_poisson_generator():
    """The sparse draw (generator version 2) against version 1's Gamma-Poisson draw per entry on
    the same means: zero fraction, library sizes, per-gene means and the mean-variance relation."""
    from pipeline.data.synthetic import negative_binomial_csr

    atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=RNG_CHUNK * 6, n_genes=800, n_donors=3), threads=1)
    new, old = [], []
    for chunk in range(6):
        rng = np.random.default_rng([0, 2, chunk])
        mean = atlas._chunk_means(chunk, rng)[0].copy()
        new.append(negative_binomial_csr(rng, mean, atlas.theta).toarray())
        reference = np.random.default_rng([1, chunk])
        old.append(
            reference.poisson(reference.standard_gamma(np.broadcast_to(atlas.theta, mean.shape)) * mean / atlas.theta)
        )
    new, old = np.concatenate(new).astype(np.float64), np.concatenate(old).astype(np.float64)
    assert abs((new == 0).mean() - (old == 0).mean()) < 0.003
    library_new, library_old = new.sum(1), old.sum(1)
    assert abs(np.median(library_new) / np.median(library_old) - 1) < 0.02
    assert abs(library_new.std() / library_old.std() - 1) < 0.05
    expressed = old.mean(0) > 0.2
    assert np.median(np.abs(new.mean(0)[expressed] / old.mean(0)[expressed] - 1)) < 0.03
    # Mean-variance: the same over-dispersion gene by gene (median ratio of variances ~ 1).
    assert abs(np.median(new.var(0)[expressed] / old.var(0)[expressed]) - 1) < 0.05
    assert abs(np.median((new == 0).mean(0) - (old == 0).mean(0))) < 0.003


def test_threads_do_not_change_the_cells():
    spec = SyntheticAtlasSpec(n_cells=5_000, n_genes=300, n_donors=3)
    one, two = SyntheticAtlas(spec, threads=1).rows(0, 5_000), SyntheticAtlas(spec, threads=2).rows(0, 5_000)
    assert (one[0] != two[0]).nnz == 0 and one[1].equals(two[1])
