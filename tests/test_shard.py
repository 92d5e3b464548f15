"""``shard`` and the sources: exact counts from h5ad, AnnData-Zarr, TileDB-SOMA and the
Census-shaped fixture; gene alignment; HVGs; clear errors that leave nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import shared_file
from pipeline.data import GeneAlignment, ShardedDataset, ShardSettings, open_source, read_manifest, write_shards


def shard_matrix(path):
    """All shards concatenated (global order) as float32 CSR, and the source row of each."""
    dataset = ShardedDataset(path)
    x = sp.vstack([ad.read_zarr(p).X for p in dataset.shard_paths]).tocsr().astype(np.float32)
    return x, dataset.obs_column("source_row"), dataset


def test_shard_pbmc3k_preserves_every_count(tmp_path):
    source_path = shared_file("pbmc3k_raw_seurat_annotations.h5ad")
    manifest = write_shards(
        open_source(str(source_path)),
        str(tmp_path / "out"),
        ShardSettings(shard_size=1_000, seed=4, block_size=700, progress=False),
    )
    source = ad.read_h5ad(source_path)
    x, rows, dataset = shard_matrix(str(tmp_path / "out"))
    assert manifest["n_obs"] == source.n_obs == x.shape[0] and x.shape[1] == source.n_vars
    assert np.array_equal(np.sort(rows), np.arange(source.n_obs))
    assert not np.array_equal(rows, np.arange(source.n_obs)), "rows were not shuffled"
    np.testing.assert_array_equal(np.asarray(x.sum(axis=1)).ravel(), np.asarray(source.X[rows].sum(axis=1)).ravel())
    assert (x != source.X[rows]).nnz == 0
    # obs travels with the rows; provenance and gene ids are recorded.
    labels = np.asarray(dataset.obs_column("cell_type_fine")).astype(str)
    assert list(labels[:50]) == list(source.obs["cell_type_fine"].astype(str).to_numpy()[rows[:50]])
    assert manifest["feature_ids"] == list(source.var_names) and manifest["feature_ids_hash"].startswith("sha256:")
    assert manifest["provenance"]["source"]["uri"] == str(source_path)
    shard = ad.read_zarr(dataset.shard_paths[0])
    assert json.loads(shard.uns["provenance"])["shard_seed"] == 4


def test_shard_census_fixture_through_open_soma(census_uri, tmp_path):
    import cellxgene_census

    with cellxgene_census.open_soma(uri=census_uri) as census:
        experiment = census["census_data"]["homo_sapiens"]
        obs = experiment.obs.read().concat().to_pandas().set_index("soma_joinid")
        x_table = experiment.ms["RNA"].X["raw"].read().tables().concat()
        truth = sp.csr_matrix(
            (x_table["soma_data"].to_numpy(), (x_table["soma_dim_0"].to_numpy(), x_table["soma_dim_1"].to_numpy())),
            shape=experiment.ms["RNA"].X["raw"].shape,
        )
    out = tmp_path / "census_shards"
    source = open_source("census", census_uri=census_uri, organism="Homo sapiens")
    manifest = write_shards(source, str(out), ShardSettings(shard_size=1_000, progress=False))
    assert manifest["provenance"]["source"]["kind"] == "census"
    assert manifest["provenance"]["source"]["obs_filter"] == "is_primary_data == True"
    x, joinids, dataset = shard_matrix(str(out))
    assert x.shape[0] == int(obs["is_primary_data"].sum())
    np.testing.assert_array_equal(np.asarray(x.sum(axis=1)).ravel(), np.asarray(truth[joinids].sum(axis=1)).ravel())
    sample = np.random.default_rng(0).choice(len(joinids), 200, replace=False)
    assert (x[sample] != truth[joinids[sample]]).nnz == 0
    assert list(np.asarray(dataset.obs_column("cell_type"))[:20]) == list(obs.loc[joinids[:20], "cell_type"])


def test_census_obs_filter_and_errors(census_uri):
    source = open_source("census", census_uri=census_uri, obs_filter="cell_type == 'B'")
    assert 0 < source.n_obs < 2638
    # A user's filter is AND-ed with the default, so a cell in several datasets is read once;
    # --all-cells drops the default. The provenance records the filter used.
    assert source.obs_filter == "(is_primary_data == True) and (cell_type == 'B')"
    assert source.provenance()["obs_filter"] == source.obs_filter
    assert open_source("census", census_uri=census_uri).obs_filter == "is_primary_data == True"
    # A sparse selection is read by point coordinates: every row must still be the right cell.
    everything = open_source("census", census_uri=census_uri, all_cells=True)
    assert everything.obs_filter is None
    full = sp.vstack([block for _, block in everything.iter_blocks(5_000)]).tocsr()
    picked = sp.vstack([block for _, block in source.iter_blocks(100)]).tocsr()
    joinids = source.read_obs()["source_row"].to_numpy()
    assert (picked != full[joinids]).nnz == 0
    with pytest.raises(ValueError, match="matches no cells"):
        open_source("census", census_uri=census_uri, obs_filter="cell_type == 'neuron'")
    with pytest.raises(ValueError, match="no organism"):
        open_source("census", census_uri=census_uri, organism="mus_musculus")
    with pytest.raises(ValueError, match="exactly one"):
        open_source("census")


def test_unreachable_census_is_one_line_with_the_way_out(monkeypatch):
    import cellxgene_census._release_directory as directory

    # A release directory on a closed loopback port: a real connection refused, as offline.
    monkeypatch.setattr(directory, "CELL_CENSUS_RELEASE_DIRECTORY_URL", "http://127.0.0.1:9/release.json")
    monkeypatch.setattr(directory, "CELL_CENSUS_MIRRORS_DIRECTORY_URL", "http://127.0.0.1:9/mirrors.json")
    with pytest.raises(
        ValueError,
        match=r"cannot reach the Census to open release 'stable' .*ConnectionError.*"
        r"use a local or mirrored copy with --census-uri PATH",
    ) as error:
        open_source("census", census_version="stable")
    assert "\n" not in str(error.value) and len(str(error.value)) < 500


def test_soma_written_by_tiledbsoma_io_and_zarr_sources_agree(tmp_path):
    import tiledbsoma.io

    source_path = shared_file("mouse_pancreas_sub1000_raw.h5ad")
    adata = ad.read_h5ad(source_path)
    soma_uri = str(tmp_path / "pancreas.soma")
    tiledbsoma.io.from_anndata(soma_uri, adata, measurement_name="RNA")
    zarr_path = str(tmp_path / "pancreas.zarr")
    adata.write_zarr(zarr_path)
    genes = list(adata.var_names[::7][::-1])  # a reordered subset
    results = {}
    for name, uri in (("soma", soma_uri), ("zarr", zarr_path)):
        out = tmp_path / f"{name}_shards"
        write_shards(open_source(uri), str(out), ShardSettings(shard_size=300, genes=genes, progress=False))
        x, rows, _ = shard_matrix(str(out))
        expected = adata[rows, genes].X
        assert (x != expected).nnz == 0, name
        results[name] = (x, rows)
    assert np.array_equal(results["soma"][1], results["zarr"][1])


def test_gene_alignment_reorders_and_zero_fills():
    counts = sp.csr_matrix(np.array([[1, 0, 3, 4], [0, 5, 0, 6]], dtype=np.float32))
    alignment = GeneAlignment(["a", "b", "c", "d"], ["d", "x", "a", "b"], min_overlap=0.5)
    assert alignment.n_found == 3 and alignment.missing == ["x"]
    np.testing.assert_array_equal(alignment.apply(counts).toarray(), [[4, 0, 1, 0], [6, 0, 0, 5]])
    with pytest.raises(ValueError, match=r"only 1 of the 4 genes.*below the minimum overlap"):
        GeneAlignment(["a", "b"], ["a", "x", "y", "z"], min_overlap=0.5, source_name="atlas.h5ad")
    with pytest.raises(ValueError, match="duplicate feature_ids"):
        GeneAlignment(["a", "a"], ["a"])


def test_streaming_hvg_selection_and_per_batch(tmp_path):
    source_path = shared_file("mouse_pancreas_sub1000_raw.h5ad")
    manifest = write_shards(
        open_source(str(source_path)),
        str(tmp_path / "hvg"),
        ShardSettings(n_top_genes=500, block_size=300, progress=False),
    )
    from pipeline.data.genes import GeneStatistics

    adata = ad.read_h5ad(source_path)
    stats = GeneStatistics(adata.n_vars)
    stats.update(sp.csr_matrix(adata.X))
    assert manifest["feature_ids"] == list(adata.var_names[stats.highly_variable(500)])
    per_batch = write_shards(
        open_source(str(source_path)),
        str(tmp_path / "hvg_batch"),
        ShardSettings(n_top_genes=500, hvg_batch_key="cell_type_coarse", progress=False),
    )
    assert per_batch["n_vars"] == 500 and per_batch["feature_ids"] != manifest["feature_ids"]


def write_h5ad(path, x, obs_names=None):
    n, g = x.shape
    obs = pd.DataFrame({"donor": ["d0"] * n}, index=obs_names or [f"cell{i}" for i in range(n)])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)])).write_h5ad(path)
    return str(path)


@pytest.mark.parametrize("value,what", [(-1.0, "is negative"), (2.5, "is not an integer"), (np.nan, "is not finite")])
def test_bad_counts_name_the_cell_and_gene(tmp_path, value, what):
    x = np.ones((6, 4), dtype=np.float32)
    x[4, 2] = value
    path = write_h5ad(tmp_path / "bad.h5ad", x)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"for cell 'cell4', gene 'G2' {what}"):
        write_shards(open_source(path), str(out), ShardSettings(shard_size=2, block_size=3, progress=False))
    assert not (out / "manifest.json").exists()


def test_errors_for_filters_layers_and_gene_lists(tmp_path):
    path = write_h5ad(tmp_path / "ok.h5ad", np.ones((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="matches no cells"):
        open_source(path, obs_filter="donor == 'nobody'")
    with pytest.raises(ValueError, match="cannot evaluate obs filter"):
        open_source(path, obs_filter="no_such_column > 3")
    with pytest.raises(ValueError, match="no 'layers/counts'"):
        open_source(path, layer="counts")
    with pytest.raises(ValueError, match="below the minimum overlap"):
        write_shards(
            open_source(path), str(tmp_path / "o"), ShardSettings(genes=["G0", "X1", "X2", "X3"], progress=False)
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "missing.h5ad"))


def test_a_min_gene_overlap_that_is_not_a_share_is_refused():
    """--min-gene-overlap 5 said "only 100 of the 100 genes ... below the minimum overlap 500%"."""
    for bad in (0.0, 5.0, -0.5):
        with pytest.raises(ValueError, match=r"--min-gene-overlap must be in \(0, 1\]"):
            ShardSettings(min_gene_overlap=bad)


def test_normalised_compressed_and_truncated_h5ad_are_named(tmp_path):
    counts = np.random.default_rng(0).poisson(2.0, size=(20, 6)).astype(np.float32)
    adata = ad.AnnData(
        sp.csr_matrix(np.log1p(counts)),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(6)]),
    )
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.raw = ad.AnnData(sp.csr_matrix(counts), var=adata.var.copy())
    adata.write_h5ad(tmp_path / "lognorm.h5ad")
    with pytest.raises(
        ValueError,
        match=r"is not an integer.*Integer counts are in 'raw', 'counts' of this source: "
        r"pass --layer raw",
    ):
        write_shards(open_source(str(tmp_path / "lognorm.h5ad")), str(tmp_path / "o1"), ShardSettings(progress=False))
    assert not (tmp_path / "o1").exists()
    write_shards(
        open_source(str(tmp_path / "lognorm.h5ad"), layer="counts"), str(tmp_path / "o2"), ShardSettings(progress=False)
    )
    assert ShardedDataset(str(tmp_path / "o2")).n_obs == 20
    import gzip

    data = (tmp_path / "lognorm.h5ad").read_bytes()
    (tmp_path / "lognorm.h5ad.gz").write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match=r"lognorm.h5ad.gz is a compressed file \(.gz\): decompress it first"):
        open_source(str(tmp_path / "lognorm.h5ad.gz"))
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.h5ad \([\d,]+ bytes\) cannot be opened as HDF5 .* truncated or damaged"):
        open_source(str(tmp_path / "cut.h5ad"))


def test_existing_output_is_kept_unless_overwrite_and_partial_runs_are_cleared(tmp_path):
    path = write_h5ad(tmp_path / "ok.h5ad", np.arange(40, dtype=np.float32).reshape(10, 4))
    out = tmp_path / "out"
    first = write_shards(open_source(path), str(out), ShardSettings(shard_size=4, progress=False))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(open_source(path), str(out), ShardSettings(shard_size=4, progress=False))
    assert read_manifest(str(out)) == first  # untouched
    # A killed run leaves shards without a manifest: the next run starts over cleanly.
    (out / "manifest.json").unlink()
    (out / ".staging").mkdir()
    (out / ".staging" / "0.bin").write_bytes(b"garbage")
    again = write_shards(open_source(path), str(out), ShardSettings(shard_size=5, progress=False))
    assert len(again["shards"]) == 2 and not (out / ".staging").exists()


def test_damaged_shard_directories_give_clear_errors(synthetic_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synthetic_shards[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    bad = dict(
        manifest,
        shards=[dict(manifest["shards"][0], n_obs=manifest["shards"][0]["n_obs"] + 1), *manifest["shards"][1:]],
        n_obs=manifest["n_obs"] + 1,
    )
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"shard-00000.zarr: X is \d+ x 300 but manifest.json says"):
        ShardedDataset(str(out)).verify()
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "shard-00002.zarr")
    with pytest.raises(FileNotFoundError, match="shard-00002.zarr is listed .* but is missing"):
        ShardedDataset(str(out))
    (out / "shard-00002.zarr").mkdir()
    with pytest.raises(ValueError, match="shard-00002.zarr: empty or unreadable shard"):
        ShardedDataset(str(out)).verify()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardedDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardedDataset(str(tmp_path / "nowhere"))


def test_edited_gene_list_and_damaged_chunks_are_named(synthetic_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synthetic_shards[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    ids = list(manifest["feature_ids"])
    ids[0], ids[1] = ids[1], ids[0]  # two genes swapped: every count would land in the wrong column
    (out / "manifest.json").write_text(json.dumps(dict(manifest, feature_ids=ids)))
    with pytest.raises(ValueError, match="feature_ids do not match their feature_ids_hash"):
        ShardedDataset(str(out))
    (out / "manifest.json").write_text(json.dumps(manifest))
    chunk = out / "shard-00001.zarr" / "X" / "data" / "c" / "0"
    original = chunk.read_bytes()
    for damaged in (original[: len(original) // 2], b"\0" * 16 + original[16:]):  # truncated, corrupt header
        chunk.write_bytes(damaged)
        dataset = ShardedDataset(str(out))
        with pytest.raises(ValueError, match=r"shard-00001.zarr/X/data/c/0: a chunk of .* is damaged") as error:
            dataset.shard(1).read(0, 10)
        assert "reshard" in str(error.value)
        with pytest.raises(ValueError, match=r"shard-00001.zarr/X/data/c/0: a chunk"):
            list(dataset.loader(batch_size=256))
    chunk.write_bytes(original)
    assert ShardedDataset(str(out)).shard(1).read(0, 10)[2].size > 0


def test_shard_cli_with_gene_list(tmp_path):
    source_path = shared_file("pbmc3k_raw_seurat_annotations.h5ad")
    genes = ad.read_h5ad(source_path, backed="r").var_names[:300].tolist() + ["ENSG_NOT_A_GENE"]
    (tmp_path / "genes.txt").write_text("# model genes\n" + "\n".join(genes) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "shard",
            str(source_path),
            "--out",
            str(tmp_path / "o"),
            "--genes",
            str(tmp_path / "genes.txt"),
            "--shard-size",
            "1000",
            "--obs-columns",
            "cell_type_fine,donor_id",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "300/301 genes found; 1 missing zero-filled" in result.stdout
    manifest = read_manifest(str(tmp_path / "o"))
    assert manifest["n_vars"] == 301 and set(manifest["obs_columns"]) == {"cell_type_fine", "donor_id", "source_row"}
    failed = subprocess.run(
        [sys.executable, "-m", "pipeline", "shard", str(source_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "--overwrite" in failed.stderr


def two_sources(tmp_path):
    """An h5ad and an AnnData-Zarr with the same barcodes, genes in other orders and other obs
    columns (as two 10x runs read by two people): their counts, and each one's genes."""
    rng = np.random.default_rng(3)
    genes_a, genes_b = [f"G{j}" for j in range(40)], [f"G{j}" for j in range(39, 5, -1)] + ["X1"]
    x_a, x_b = rng.poisson(1.5, (70, 40)).astype(np.float32), rng.poisson(1.5, (50, 35)).astype(np.float32)
    barcodes = [f"AAAC{i}-1" for i in range(70)]
    obs_a = pd.DataFrame({"donor": pd.Categorical(rng.choice(["d0", "d1"], 70)), "n_umi": np.arange(70)}, barcodes)
    obs_b = pd.DataFrame({"cell_type": ["T"] * 50}, index=barcodes[:50])
    ad.AnnData(X=sp.csr_matrix(x_a), obs=obs_a, var=pd.DataFrame(index=genes_a)).write_h5ad(tmp_path / "run1.h5ad")
    ad.AnnData(X=sp.csr_matrix(x_b), obs=obs_b, var=pd.DataFrame(index=genes_b)).write_zarr(tmp_path / "run2.zarr")
    return [str(tmp_path / "run1.h5ad"), str(tmp_path / "run2.zarr")], {"run1": (x_a, genes_a), "run2": (x_b, genes_b)}


def test_several_sources_shard_as_one_atlas(tmp_path):
    """`shard a.h5ad b.zarr`: one shard set of every cell of both, on the genes both measure (none
    zero-filled), obs columns united, source_file naming each cell's file; ids that repeat across
    the files are refused before anything is written, and --prefix-ids makes them unique."""
    from pipeline.data import open_sources

    paths, truth = two_sources(tmp_path)
    settings = ShardSettings(shard_size=40, block_size=32, progress=False)
    with pytest.raises(ValueError, match="50 obs names occur more than once.*pass --prefix-ids"):
        write_shards(open_sources(paths), str(tmp_path / "refused"), settings)
    assert not (tmp_path / "refused" / "manifest.json").exists()
    write_shards(open_sources(paths, prefix_ids=True), str(tmp_path / "one"), settings)
    x, rows, dataset = shard_matrix(str(tmp_path / "one"))
    manifest = read_manifest(str(tmp_path / "one"))
    genes = manifest["feature_ids"]
    assert genes == [f"G{j}" for j in range(6, 40)]  # measured by both, in the first file's order
    obs = pd.concat([ad.read_zarr(p).obs for p in dataset.shard_paths])
    assert sorted(obs.index) == sorted([f"run1:AAAC{i}-1" for i in range(70)] + [f"run2:AAAC{i}-1" for i in range(50)])
    for i, (name, row) in enumerate(zip(obs.index, rows)):  # every count where it was, cell by cell
        counts, source_genes = truth[name.split(":")[0]]
        np.testing.assert_array_equal(x[i].toarray()[0], counts[row, [source_genes.index(g) for g in genes]])
    assert obs["source_file"].value_counts().to_dict() == {"run1": 70, "run2": 50}
    assert obs.loc[obs.source_file == "run2", "donor"].isna().all() and obs["n_umi"].dtype == np.float64
    assert (obs.loc[obs.source_file == "run2", "cell_type"] == "T").all()
    recorded = manifest["provenance"]["source"]
    assert recorded["kind"] == "concat" and [s["uri"] for s in recorded["sources"]] == paths
    assert [s["n_obs"] for s in recorded["sources"]] == [70, 50]
    # a gene list: each file aligned to it as embed aligns a source, what one lacks zero-filled
    write_shards(open_sources(paths, prefix_ids=True, genes=["G1", "X1", "G30"]), str(tmp_path / "listed"), settings)
    x, _, dataset = shard_matrix(str(tmp_path / "listed"))
    source_file = dataset.obs_column("source_file")
    assert x[:, 1][source_file == "run1"].sum() == 0 and x[:, 0][source_file == "run2"].sum() == 0
    run2_g30 = truth["run2"][1].index("G30")
    assert x[:, 2].sum() == truth["run1"][0][:, 30].sum() + truth["run2"][0][:, run2_g30].sum()
    # files that share too few genes, and --prefix-ids with one file, are named
    with pytest.raises(ValueError, match=r"run1.h5ad: only 34 of its 40 genes.*below the minimum overlap 90%"):
        open_sources(paths, min_overlap=0.9)
    with pytest.raises(ValueError, match="--prefix-ids goes with several sources"):
        open_sources(paths[:1], prefix_ids=True)


def test_fsspec_url_output_and_input(tmp_path):
    """Shards written to and read from an fsspec URL (memory://, as for s3://) hold the same counts."""
    source_path = str(shared_file("mouse_pancreas_sub1000_raw.h5ad"))
    settings = ShardSettings(shard_size=400, seed=1, progress=False)
    write_shards(open_source(source_path), "memory://bucket/pancreas", settings)
    write_shards(open_source(source_path), str(tmp_path / "local"), settings)
    remote, local = ShardedDataset("memory://bucket/pancreas"), ShardedDataset(str(tmp_path / "local"))
    assert len(remote.loader(256, seed=3)) == 4  # 1,000 cells: the comparison below is not vacuous
    for got, want in zip(remote.loader(256, seed=3), local.loader(256, seed=3), strict=True):
        assert np.array_equal(got["obs_index"].numpy(), want["obs_index"].numpy())
        assert np.array_equal(got["counts"].to_dense().numpy(), want["counts"].to_dense().numpy())


def test_counts_beyond_uint16_are_kept_exactly(tmp_path):
    x = np.arange(1, 61, dtype=np.float32).reshape(12, 5)
    x[7, 3] = 1_000_000.0  # a highly expressed gene in one cell
    path = write_h5ad(tmp_path / "big.h5ad", x)
    manifest = write_shards(
        open_source(path), str(tmp_path / "out"), ShardSettings(shard_size=5, block_size=4, progress=False)
    )
    assert manifest["count_dtype"] == "uint32" and manifest["max_count"] == 1_000_000
    got, rows, _ = shard_matrix(str(tmp_path / "out"))
    np.testing.assert_array_equal(got.toarray(), x[rows])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_compression_reads_back_the_same_batches(tmp_path, compression):
    source_path = str(shared_file("mouse_pancreas_sub1000_raw.h5ad"))
    write_shards(open_source(source_path), str(tmp_path / "lz4"), ShardSettings(shard_size=300, progress=False))
    write_shards(
        open_source(source_path),
        str(tmp_path / compression),
        ShardSettings(shard_size=300, progress=False, compression=compression),
    )
    reference, other = ShardedDataset(str(tmp_path / "lz4")), ShardedDataset(str(tmp_path / compression))
    assert other.manifest["compression"] == compression
    assert other.shard(0).data._layout is not None, "the fast read path was not taken"
    assert len(other.loader(128, seed=2, block_rows=100)) == 8  # 1,000 cells: not a vacuous comparison
    for got, want in zip(
        other.loader(128, seed=2, block_rows=100), reference.loader(128, seed=2, block_rows=100), strict=True
    ):
        assert np.array_equal(got["counts"].to_dense().numpy(), want["counts"].to_dense().numpy())
    assert (ad.read_zarr(other.shard_paths[1]).X != ad.read_zarr(reference.shard_paths[1]).X).nnz == 0


def test_shard_never_deletes_what_it_did_not_write(tmp_path):
    x = np.arange(1, 61, dtype=np.float32).reshape(12, 5)
    good = write_h5ad(tmp_path / "good.h5ad", x)
    # A folder of someone else's files is refused, untouched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a shard directory"):
        write_shards(open_source(good), str(mine), ShardSettings(shard_size=5, progress=False))
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # --overwrite with a bad source leaves the finished shard set byte-identical ...
    out = tmp_path / "out"
    write_shards(open_source(good), str(out), ShardSettings(shard_size=5, progress=False))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad_x = x.copy()
    bad_x[7, 2] = -1.0
    bad = write_h5ad(tmp_path / "bad.h5ad", bad_x)
    with pytest.raises(ValueError, match="negative"):
        write_shards(open_source(bad), str(out), ShardSettings(shard_size=5, progress=False, overwrite=True))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # ... and a good one replaces it once complete.
    write_shards(open_source(good), str(out), ShardSettings(shard_size=4, progress=False, overwrite=True))
    assert len(read_manifest(str(out))["shards"]) == 3 and not (tmp_path / "out.overwrite-partial").exists()
    # Duplicate obs names are refused, the first named.
    duplicated = write_h5ad(tmp_path / "dup.h5ad", x, obs_names=["a", "a"] + [f"c{i}" for i in range(10)])
    with pytest.raises(ValueError, match=r"1 obs names occur more than once \(e.g. \['a'\]\)"):
        write_shards(open_source(duplicated), str(tmp_path / "dup"), ShardSettings(shard_size=5, progress=False))


def shard_files(path) -> dict:
    """Every shard's X arrays and obs, by shard name: what the loader reads."""
    import zarr
    from anndata.io import read_elem

    out = {}
    for name in sorted(os.listdir(path)):
        if name.startswith("shard-"):
            group = zarr.open_group(os.path.join(path, name), mode="r")
            out[name] = (
                [np.asarray(group[f"X/{k}"][:]) for k in ("data", "indices", "indptr")],
                read_elem(group["obs"]),
            )
    return out


def assert_same_shards(a, b) -> None:
    left, right = shard_files(a), shard_files(b)
    assert list(left) == list(right)
    for name in left:
        for x, y in zip(left[name][0], right[name][0]):
            np.testing.assert_array_equal(x, y)
        pd.testing.assert_frame_equal(left[name][1], right[name][1])
    manifests = [json.loads(open(os.path.join(p, "manifest.json")).read()) for p in (a, b)]
    for key in ("n_obs", "count_checksum", "shards", "obs_columns", "feature_ids", "count_dtype"):
        assert manifests[0][key] == manifests[1][key], key


@pytest.mark.slow
@pytest.mark.ray
def test_shard_on_ray_workers_writes_the_same_shards_and_survives_a_killed_task(tmp_path):
    """`shard --workers 2` (a local Ray cluster): one shard set, identical to the one-process
    run for the same seed (the highly variable genes summed on the workers too); a pass-1 task
    SIGKILLed mid-way is retried by Ray, nothing duplicated; the whole job killed is rerun to the
    same set; the generator and several files as one atlas go through the same path."""
    source = shared_file("pbmc3k_raw_seurat_annotations.h5ad")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "shard",
        str(source),
        "--shard-size",
        "400",
        "--block-size",
        "300",
        "--n-top-genes",
        "800",
    ]
    one = subprocess.run([*args, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    markers = tmp_path / "markers"
    markers.mkdir()
    killed = subprocess.run(
        [*args, "--out", str(tmp_path / "two"), "--workers", "2"],
        capture_output=True,
        text=True,
        env={**env, "HVAE_KILL_SHARD_PART": "1", "HVAE_KILL_MARKERS": str(markers)},
    )
    assert killed.returncode == 0, killed.stderr[-3000:]
    # part 1 (2 blocks of 300 rows) was armed to die at its second spill: it died, Ray retried it
    assert (markers / ".killed_part_1").exists()
    assert_same_shards(tmp_path / "one", tmp_path / "two")
    x, rows, _ = shard_matrix(str(tmp_path / "two"))
    assert np.array_equal(np.sort(rows), np.arange(2700)) and x.shape[1] == 800  # every cell exactly once
    assert not (tmp_path / "two" / ".staging").exists()
    # The whole job SIGKILLed in pass 1 (driver, Ray and its workers: a cancelled Slurm job, an
    # evicted pod): no shard set meanwhile; the rerun clears what was spilled and ends the same.
    out = tmp_path / "three"
    job = subprocess.Popen(
        [*args, "--out", str(out), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the job and the Ray it started, as a scheduler kills them
    )
    deadline = time.monotonic() + 120
    while not list((out / ".staging").glob("part-*/*.obs")) and time.monotonic() < deadline:
        assert job.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "manifest.json").exists() and list((out / ".staging").glob("part-*"))
    rerun = subprocess.run([*args, "--out", str(out), "--workers", "2"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_shards(tmp_path / "one", out)
    assert not (out / ".staging").exists()
    # simulate --format shards goes through the same path
    sim = [
        sys.executable,
        "-m",
        "pipeline",
        "simulate",
        "--n-cells",
        "3000",
        "--n-genes",
        "200",
        "--format",
        "shards",
        "--shard-size",
        "700",
        "--block-size",
        "500",
    ]
    for name, workers in (("sim0", "0"), ("sim2", "2")):
        done = subprocess.run(
            [*sim, str(tmp_path / name), "--workers", workers], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_shards(tmp_path / "sim0", tmp_path / "sim2")
    # several files as one atlas: the workers' partitions cross from one file to the next
    paths, _ = two_sources(tmp_path)
    cat = [
        sys.executable,
        "-m",
        "pipeline",
        "shard",
        *paths,
        "--prefix-ids",
        "--shard-size",
        "40",
        "--block-size",
        "16",
    ]
    for name, workers in (("cat0", "0"), ("cat2", "2")):
        done = subprocess.run(
            [*cat, "--out", str(tmp_path / name), "--workers", workers], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "gene alignment of run2: 34/34 genes found" in done.stdout
    assert_same_shards(tmp_path / "cat0", tmp_path / "cat2")


def test_shard_workers_need_a_shared_path_and_a_source_to_reopen(tmp_path):
    source = open_source(str(shared_file("pancreas_sub1000_raw.h5ad".replace("pancreas", "mouse_pancreas"))))
    with pytest.raises(ValueError, match="give --staging DIR on a filesystem every worker sees"):
        write_shards(source, "s3://bucket/shards", ShardSettings(workers=2), reopen=lambda: source)
    with pytest.raises(ValueError, match="--staging s3://bucket/spill must be a local or shared filesystem path"):
        write_shards(source, "s3://b/s", ShardSettings(workers=2, staging="s3://bucket/spill"), reopen=lambda: source)
    with pytest.raises(ValueError, match="workers can open"):
        write_shards(source, str(tmp_path / "out"), ShardSettings(workers=2))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="workers must be"):
        ShardSettings(workers=-1)


# pandas 3's string dtype (pandas 2: future.infer_string) in every process of the chain.
PANDAS_3_STRINGS = (
    "import sys, pandas as pd; pd.set_option('future.infer_string', True); "
    "from pipeline.cli import main; sys.argv = ['hvae-pipeline', *sys.argv[1:]]; main()"
)


@pytest.mark.slow
def test_simulate_shard_train_embed_with_pandas_3_strings(tmp_path):
    """Under pandas 3 text columns are a string dtype anndata 0.12 refuses to write: shard
    (AnnData-Zarr obs and var), simulate and query write them as object strings, which every
    anndata reads (here: read back under the other pandas setting)."""

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-c", PANDAS_3_STRINGS, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
        return done.stdout

    source, shards, runs, out = tmp_path / "atlas.h5ad", tmp_path / "shards", tmp_path / "runs", tmp_path / "e.zarr"
    run("simulate", str(source), "--n-cells", "1200", "--n-genes", "150")
    run("shard", str(source), "--out", str(shards), "--shard-size", "600")
    run(
        "train",
        f"data.path={shards}",
        "train.max_steps=2",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={runs}",
        "model.latent_dims=[4,2]",
        "model.hidden_dim=16",
    )
    assert "embedded 1,200 cells" in run(
        "embed", "--checkpoint", str(runs / "hvae"), "--source", str(source), "--out", str(out)
    )
    shard = ad.read_zarr(ShardedDataset(str(shards)).shard_paths[0])
    assert shard.n_obs == 600 and shard.obs["cell_type"].dtype == "category"
    assert shard.var["feature_name"].dtype == object and shard.obs_names.dtype == object
    original = ad.read_h5ad(source)
    assert set(shard.obs_names) <= set(original.obs_names)
    from pipeline.embed import read_embeddings

    assert read_embeddings(str(out), lazy=False).n_obs == 1200
