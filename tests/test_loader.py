"""ShardedDataset loader: exactly once per epoch across ranks and workers, equal batch counts,
seeded order, resume from state_dict, sparse batches that densify exactly, bounded memory."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.data import ShardedDataset, densify, rank_batch_sizes


def epoch_ids(dataset, world_size, num_workers, batch_size=128, seed=0, epoch=0, **options):
    per_rank = []
    for rank in range(world_size):
        loader = dataset.loader(
            batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch, num_workers=num_workers, **options
        )
        batches = [b["obs_index"].numpy() for b in loader]
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 2), (3, 0)])
def test_each_cell_exactly_once_and_equal_batches(synthetic_shards, world_size, num_workers):
    dataset = ShardedDataset(synthetic_shards[0])
    per_rank = epoch_ids(dataset, world_size, num_workers, block_rows=300, window_blocks=3)
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1, f"ranks got different numbers of batches: {[len(b) for b in per_rank]}"
    everything = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert len(everything) == dataset.n_obs == 5_003
    assert np.array_equal(np.sort(everything), np.arange(dataset.n_obs))
    assert all(len(b) > 0 for batches in per_rank for b in batches)


def test_rank_batch_sizes_edge_cases():
    for n_obs, batch, world in [(10, 2, 3), (9, 4, 2), (8193, 4096, 2), (8191, 4096, 2), (7, 1, 7), (100, 1000, 4)]:
        offsets, sizes = rank_batch_sizes(n_obs, batch, world)
        assert offsets[-1] == n_obs and len({len(s) for s in sizes}) == 1
        assert all((s > 0).all() and (s <= batch).all() for s in sizes)
        assert sum(int(s.sum()) for s in sizes) == n_obs
    with pytest.raises(ValueError, match="cannot be split"):
        rank_batch_sizes(2, 4, 3)


def test_order_is_seeded_and_changes_per_epoch(synthetic_shards):
    dataset = ShardedDataset(synthetic_shards[0])
    first = np.concatenate(epoch_ids(dataset, 1, 0, seed=5, epoch=0)[0])
    again = np.concatenate(epoch_ids(dataset, 1, 0, seed=5, epoch=0)[0])
    other_epoch = np.concatenate(epoch_ids(dataset, 1, 0, seed=5, epoch=1)[0])
    other_seed = np.concatenate(epoch_ids(dataset, 1, 0, seed=6, epoch=0)[0])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_epoch) and not np.array_equal(first, other_seed)
    # A different epoch regroups cells into different batches, not just reorders batches.
    batch_of = lambda ids: {frozenset(b) for b in np.array_split(ids, len(ids) // 128)}  # noqa: E731
    assert len(batch_of(first) & batch_of(other_epoch)) == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict(synthetic_shards, num_workers):
    dataset = ShardedDataset(synthetic_shards[0])
    options = dict(rank=1, world_size=2, seed=2, epoch=3, num_workers=num_workers, block_rows=256, window_blocks=2)
    full = [b["obs_index"].numpy() for b in dataset.loader(100, **options)]
    for stop_after in (6, 7, len(full) - 1):  # even, odd (worker rotation) and the last batch
        loader = dataset.loader(100, **options)
        head = []
        for batch in loader:
            head.append(batch["obs_index"].numpy())
            if len(head) == stop_after:
                break
        state = loader.state_dict()
        resumed = dataset.loader(100, **options)
        resumed.load_state_dict(state)
        tail = [b["obs_index"].numpy() for b in resumed]
        assert len(head) + len(tail) == len(full)
        for got, want in zip(head + tail, full, strict=True):
            assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.loader(50, **options).load_state_dict(state)


def test_batches_hold_the_shard_counts_and_batch_codes(synthetic_shards):
    path, atlas = synthetic_shards
    dataset = ShardedDataset(path)
    source_rows = dataset.obs_column("source_row")
    donors = dataset.obs_column("donor_id")
    categories = dataset.categories("donor_id")
    truth = sp.vstack([atlas.rows(0, atlas.spec.n_cells)[0]]).tocsr()
    n_checked = 0
    for batch in dataset.loader(512, seed=1, batch_key="donor_id", segment_rows=1):
        counts = batch["counts"]
        assert counts.data.dtype == torch.uint16 and counts.indices.dtype == torch.int16
        dense = densify(counts, "cpu")
        rows = source_rows[batch["obs_index"].numpy()]
        np.testing.assert_array_equal(dense.numpy(), truth[rows].toarray())
        assert [categories[c] for c in batch["batch_index"].tolist()] == list(
            np.asarray(donors)[batch["obs_index"].numpy()]
        )
        n_checked += len(rows)
    assert n_checked == atlas.spec.n_cells


def test_batches_mix_donors_stored_contiguously(synthetic_shards):
    dataset = ShardedDataset(synthetic_shards[0])
    donors = np.asarray(dataset.obs_column("donor_id"))
    n_donors = len(np.unique(donors))
    entropies = []
    for batch in dataset.loader(256, seed=0):
        _, counts = np.unique(donors[batch["obs_index"].numpy()], return_counts=True)
        p = counts / counts.sum()
        entropies.append(-(p * np.log(p)).sum())
    assert np.mean(entropies) > 0.95 * np.log(n_donors)  # the source stores donors contiguously


def test_loader_memory_is_bounded_by_configuration_not_cells(tmp_path):
    """Peak traced allocations (numpy reports to tracemalloc) stay under a bound set by the window
    and prefetch sizes, for 3k and for 8x more cells."""
    import tracemalloc

    from pipeline.data import ShardSettings, write_shards
    from pipeline.data.sources import SyntheticSource
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

    block_rows, window_blocks, batch, prefetch = 500, 2, 256, 2
    for n_cells in (3_000, 24_000):
        out = tmp_path / f"s{n_cells}"
        atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=n_cells, n_genes=200, seed=1))
        write_shards(SyntheticSource(atlas), str(out), ShardSettings(shard_size=3_000, progress=False))
        dataset = ShardedDataset(str(out))
        dataset.obs_column("source_row")  # opens every shard (cached indptr, O(cells), not traced below)
        nnz_per_row = max(np.diff(dataset.shard(k).indptr).max() for k in range(len(dataset.shard_paths)))
        row_bytes = nnz_per_row * 4 + 8 * 4  # uint16 + int16 per entry; indptr, ids, order per row
        bound = 3 * block_rows * window_blocks * row_bytes + (prefetch + 3) * batch * row_bytes + 1_000_000
        tracemalloc.start()
        for _ in dataset.loader(batch, block_rows=block_rows, window_blocks=window_blocks, prefetch=prefetch):
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < bound, f"{n_cells} cells: peak traced memory {peak} bytes > bound {bound}"


def test_csr_batch_to_dense_matches_scipy():
    rng = np.random.default_rng(0)
    matrix = sp.random(37, 53, density=0.2, format="csr", random_state=1)
    matrix.data = rng.integers(1, 500, matrix.nnz).astype(np.uint16)
    from pipeline.data import CSRBatch

    batch = CSRBatch(
        torch.from_numpy(matrix.indptr.astype(np.int64)),
        torch.from_numpy(matrix.indices.astype(np.int16)),
        torch.from_numpy(matrix.data),
        53,
    )
    assert batch.shape == (37, 53)
    np.testing.assert_array_equal(batch.to_dense().numpy(), matrix.toarray().astype(np.float32))
    assert batch.to_dense(torch.bfloat16).dtype == torch.bfloat16
