"""The notebook API: an AnnData as users have it in, representations out, a checkpoint that
`hvae-pipeline embed` takes."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import shared_file


@pytest.fixture(scope="module")
def pbmc():
    adata = ad.read_h5ad(shared_file("pbmc3k_raw_seurat_annotations.h5ad"))
    # As sc.read_10x_mtx leaves it: symbols as var_names, Ensembl ids in var["gene_ids"].
    adata.var["gene_ids"] = adata.var_names.astype(str)
    adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    adata.var_names_make_unique()
    return adata


def test_the_readme_example_runs(pbmc, tmp_path):
    adata = pbmc[:600].copy()
    # --- the README's Python example (kept in step with it) ---
    from pipeline import HVAEModel

    model = HVAEModel(adata, n_top_genes=500, latent_dims=(8, 4, 2), hidden_dim=32)
    model.train(max_steps=30, batch_size=64, progress=False)
    adata.obsm["X_hvae"] = model.get_latent_representation(level=0)  # level 0: the finest
    model.save(tmp_path / "my_model")  # hvae-pipeline embed takes it
    # ---
    assert adata.obsm["X_hvae"].shape == (
        600,
        8,
    )  # level 0 is what the read-out reads: the levels above decode gene modules
    levels = model.get_latent_representation(level="all")
    assert sorted(levels) == [0, 1, 2] and levels[2].shape == (600, 8)  # every level in the read-out's coordinates
    np.testing.assert_allclose(levels[0], adata.obsm["X_hvae"])
    assert model.feature_ids[0].startswith("ENSG") and not model.feature_names[0].startswith("ENSG")

    loaded = HVAEModel.load(tmp_path / "my_model")
    np.testing.assert_allclose(loaded.get_latent_representation(adata), adata.obsm["X_hvae"], rtol=1e-5, atol=1e-6)

    # The saved checkpoint is one the command line embeds, with the same numbers.
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "emb.zarr"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "embed",
            "--checkpoint",
            str(tmp_path / "my_model"),
            "--source",
            str(source),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "500/500 genes found" in done.stdout  # ids found in var['gene_ids'], not the symbols
    from pipeline.embed import read_embeddings

    np.testing.assert_allclose(
        read_embeddings(str(out), lazy=False).obsm["X_hvae_level_0"], adata.obsm["X_hvae"], rtol=1e-4, atol=1e-5
    )


def test_new_cells_are_aligned_by_gene_id_and_bad_input_is_named(pbmc, tmp_path, capsys):
    from pipeline import HVAEModel

    adata = pbmc[:300].copy()
    model = HVAEModel(adata, n_top_genes=300, latent_dims=(4, 2), hidden_dim=16).train(
        max_steps=5, batch_size=64, progress=False
    )
    shuffled = adata[:, ::-1].copy()  # another gene order: aligned by id, the same representation
    np.testing.assert_allclose(
        model.get_latent_representation(shuffled), model.get_latent_representation(), rtol=1e-5, atol=1e-6
    )
    assert "300/300 genes found" in capsys.readouterr().out

    symbols_only = adata.copy()
    del symbols_only.var["gene_ids"]
    with pytest.raises(ValueError, match=r"only 0 of the 300 genes.*read from var.index.*gene_ids.*--gene-column"):
        model.get_latent_representation(symbols_only)

    normalised = adata.copy()
    normalised.layers["counts"] = normalised.X.copy()
    normalised.X = sp.csr_matrix(np.log1p(normalised.X.toarray()))
    with pytest.raises(
        ValueError, match=r"X does not hold raw counts.*look to be in \['counts'\], pass layer='counts'"
    ):
        HVAEModel(normalised)
    assert HVAEModel(normalised, layer="counts", n_top_genes=300).config.n_genes == 300
    with pytest.raises(ValueError, match="level must be 0..1 or 'all'"):
        model.get_latent_representation(level=5)
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a checkpoint"):
        model.save(tmp_path / "not_a_model")
    assert (tmp_path / "not_a_model" / "notes.txt").read_text() == "mine"


def test_a_short_run_says_what_it_did_and_warns(pbmc, capsys):
    from pipeline import HVAEModel

    model = HVAEModel(pbmc[:300].copy(), n_top_genes=300, latent_dims=(4, 2), hidden_dim=16)
    with pytest.warns(UserWarning, match="before the KL warm-up finished"):
        model.train(max_steps=6, batch_size=64, kl_warmup_steps=100)
    out = capsys.readouterr().out
    assert (
        "training on cpu: 270 cells (30 held out for early stopping) x 300 genes" in out
        and "KL warm-up 100 steps" in out
    )


def test_a_saved_model_remembers_its_anndata_setup(pbmc, tmp_path, capsys):
    """Trained on a layer: loaded the next day, it reads the same AnnData (and the command line the
    same file) without being told the layer again; batches unseen in training are reported."""
    from pipeline import HVAEModel

    adata = pbmc[:300].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # as after sc.pp.log1p: X no longer counts
    adata.obs["donor"] = np.where(np.arange(300) % 2, "d1", "d2")
    model = HVAEModel(adata, layer="counts", batch_key="donor", n_top_genes=200, latent_dims=(4, 2), hidden_dim=16)
    model.train(max_steps=5, batch_size=64, progress=False)
    expected = model.get_latent_representation(level="all")
    model.save(tmp_path / "m")

    loaded = HVAEModel.load(tmp_path / "m")
    assert (loaded.layer, loaded.batch_key, loaded.batch_categories, loaded.n_top_genes) == (
        "counts",
        "donor",
        ["d1", "d2"],
        200,
    )
    np.testing.assert_allclose(loaded.get_latent_representation(adata), expected[0], rtol=1e-5, atol=1e-6)
    bound = HVAEModel.load(tmp_path / "m", adata=adata)  # bound now: encodes these cells with no argument
    np.testing.assert_allclose(bound.get_latent_representation(level=1), expected[1], rtol=1e-5, atol=1e-6)
    assert bound._batch_index is not None

    new_donor = adata[:50].copy()
    new_donor.obs["donor"] = "d9"
    capsys.readouterr()
    unseen = HVAEModel.load(tmp_path / "m", adata=new_donor)
    assert "50 cells of 1 donor value(s) unseen in training (e.g. ['d9'])" in capsys.readouterr().out
    np.testing.assert_allclose(unseen.get_latent_representation(), expected[0][:50], rtol=1e-5, atol=1e-6)

    source, out = tmp_path / "cells.h5ad", tmp_path / "e.zarr"
    adata.write_h5ad(source)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "embed",
            "--checkpoint",
            str(tmp_path / "m"),
            "--source",
            str(source),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layer 'counts' (recorded with the model" in done.stdout
    from pipeline.embed import read_embeddings

    np.testing.assert_allclose(
        read_embeddings(str(out), lazy=False).obsm["X_hvae_level_0"], expected[0], rtol=1e-4, atol=1e-5
    )


def test_gene_modules_are_built_from_the_cells_and_kept_with_the_model(pbmc, tmp_path):
    """``module_levels``: the model builds its coarse levels' gene modules from the AnnData it is
    given; saved and loaded, it keeps them (a loaded model has no cells to build them from)."""
    from pipeline import HVAEModel

    adata = pbmc[:400].copy()
    model = HVAEModel(
        adata,
        n_top_genes=150,
        latent_dims=(6, 4, 2),
        hidden_dim=16,
        module_levels=[(5, 4), (10, 6)],
        kl_capacity=[0, 3, 2],
    )
    partitions = model.config.gene_modules
    assert [len(p) for p in partitions] == [150, 150] and [len(set(p)) for p in partitions] == [5, 10]
    model.train(max_steps=5, batch_size=64, progress=False)
    expected = model.get_latent_representation(level="all")
    model.save(tmp_path / "m")
    loaded = HVAEModel.load(tmp_path / "m")
    assert loaded.config.gene_modules == partitions and loaded.config.module_levels == ((5, 4), (10, 6))
    np.testing.assert_allclose(loaded.get_latent_representation(adata, level=2), expected[2], rtol=1e-5, atol=1e-6)


def test_careless_input_is_refused_by_name(pbmc, tmp_path, capsys):
    from pipeline import HVAEModel

    adata = pbmc[:200].copy()
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match="n_top_genes must be a positive integer"):
            HVAEModel(adata, n_top_genes=bad)
    with pytest.raises(ValueError, match="0 cells"):
        HVAEModel(adata[:0].copy())
    adata.obs["depth"] = np.random.default_rng(0).normal(size=200)
    with pytest.raises(ValueError, match="batch_key 'depth' holds continuous numbers"):
        HVAEModel(adata, batch_key="depth")
    adata.obs["donor"] = pd.Series(["a", None] * 100, index=adata.obs_names, dtype=object)
    with pytest.raises(ValueError, match="batch_key 'donor' is missing for 100 cells"):
        HVAEModel(adata, batch_key="donor")
    half = list(adata.var["gene_ids"][:100]) + [f"ENSG_NOT_HERE_{i}" for i in range(100)]
    model = HVAEModel(adata, genes=half, latent_dims=(4, 2), hidden_dim=16)
    assert "100/200 genes found" in capsys.readouterr().out  # zero-filled genes are said, not silent
    with pytest.raises(ValueError, match="level must be"):
        model.get_latent_representation(level=True)
    with pytest.warns(UserWarning, match="never trained"):
        model.save(tmp_path / "untrained")


def test_a_batch_column_of_ids_is_refused_at_construction(pbmc):
    from pipeline import HVAEModel

    adata = pbmc[:200].copy()
    adata.obs["serial"] = np.arange(200)  # integers, one per cell
    adata.obs["barcode"] = adata.obs_names.astype(str)
    for key, said in (("serial", "holds continuous numbers"), ("barcode", "nearly one batch per cell")):
        with pytest.raises(ValueError, match=f"batch_key '{key}' .*{said}"):
            HVAEModel(adata, batch_key=key)


def test_an_untrained_model_warns_when_it_embeds(pbmc):
    from pipeline import HVAEModel

    model = HVAEModel(pbmc[:200].copy(), latent_dims=(4, 2), hidden_dim=16)
    with pytest.warns(UserWarning, match="never trained"):
        model.get_latent_representation()


def test_a_gene_list_mostly_absent_and_a_zero_batch_size_are_refused(pbmc):
    from pipeline import HVAEModel

    adata = pbmc[:200].copy()
    few = list(adata.var["gene_ids"][:40]) + [f"ENSG_NOT_HERE_{i}" for i in range(160)]
    with pytest.raises(ValueError, match="only 40 of the 200 genes .* below the minimum overlap 50%"):
        HVAEModel(adata, genes=few)
    with pytest.raises(ValueError, match="batch_size"):
        HVAEModel(adata, latent_dims=(4, 2), hidden_dim=16).train(max_steps=5, batch_size=0, progress=False)
