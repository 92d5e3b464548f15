"""``embed`` computes the posterior variances (a forward-mode Jacobian of every upper level's
export, several times the cost of the means) only when ``--logvar`` asks for them."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr

from hvae import HVAEConfig, HierarchicalVAE, exports, fit_gene_modules
from pipeline.config import TrainConfig
from pipeline.embed import EmbedSettings, embed
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.step import Trainer


@pytest.fixture
def small(tmp_path):
    """A fresh 3-level model saved as a checkpoint, and a 300-cell h5ad of its genes."""
    genes = [f"gene{i}" for i in range(60)]
    torch.manual_seed(0)
    config = fit_gene_modules(
        HVAEConfig(n_genes=len(genes), latent_dims=(8, 6, 4), hidden_dim=32),
        torch.poisson(torch.full((256, len(genes)), 1.5)),
    )
    save_checkpoint(
        tmp_path / "checkpoint",
        Trainer(HierarchicalVAE(config), TrainConfig()),
        config,
        "{}\n",
        {"step": 0},
        genes,
        None,
        [],
    )
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(1.5, (300, len(genes))).astype(np.float32))
    adata = ad.AnnData(counts, var=pd.DataFrame(index=genes), obs=pd.DataFrame(index=[f"cell{i}" for i in range(300)]))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    return tmp_path


def test_embed_computes_variances_only_when_asked(small, monkeypatch):
    calls = []
    original = exports.level_export_logvar

    def counted(model, *args, **kwargs):
        calls.append(args[0])
        return original(model, *args, **kwargs)

    monkeypatch.setattr(exports, "level_export_logvar", counted)
    said = []
    for logvar in (False, True):
        settings = EmbedSettings(chunk_rows=128, batch_size=64, logvar=logvar, progress=False)
        embed(
            str(small / "checkpoint"),
            {"source": str(small / "cells.h5ad")},
            str(small / f"{logvar}.zarr"),
            settings,
            echo=said.append,
        )
        if not logvar:
            assert calls == [], "embed without --logvar ran the variance path"
            assert not any("--logvar" in line for line in said)
    # With --logvar: every level of every batch (3 chunks of 2, 2 and 1 batches), and its cost said first.
    assert sorted(set(calls)) == [0, 1, 2] and len(calls) >= 3 * 5
    assert any(line.startswith("--logvar: about") and "x the time of the means" in line for line in said)
    means = zarr.open_group(str(small / "False.zarr"), mode="r")
    both = zarr.open_group(str(small / "True.zarr"), mode="r")
    assert "level_0/logvar" not in means and both["level_2/logvar"].shape == (
        300,
        8,
    )  # level 0's width: the levels above decode gene modules
    for level in range(3):  # the means do not depend on whether the variances were asked for
        np.testing.assert_array_equal(means[f"level_{level}/mean"][:], both[f"level_{level}/mean"][:])
    assert np.isfinite(both["level_1/logvar"][:]).all()


def test_a_source_rewritten_in_place_is_not_taken_for_the_one_embedded(small):
    """Same ids, same genes, other values: a rerun neither resumes nor calls the old store complete."""
    import os
    import time

    settings = EmbedSettings(chunk_rows=128, batch_size=64, progress=False)
    source, out = small / "cells.h5ad", small / "e.zarr"
    embed(str(small / "checkpoint"), {"source": str(source)}, str(out), settings, echo=lambda *_: None)
    again = []
    embed(str(small / "checkpoint"), {"source": str(source)}, str(out), settings, echo=again.append)
    assert any("already complete" in line for line in again)
    adata = ad.read_h5ad(source)
    adata.X = sp.csr_matrix(adata.X.toarray()[::-1])  # other counts under the same ids and genes
    time.sleep(0.01)
    adata.write_h5ad(source)
    os.utime(source, (time.time() + 5, time.time() + 5))  # a later write, whatever the clock's resolution
    with pytest.raises(FileExistsError, match="embedded from another source.*files written"):
        embed(str(small / "checkpoint"), {"source": str(source)}, str(out), settings, echo=lambda *_: None)
