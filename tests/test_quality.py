"""The model learns a useful hierarchy: a short CPU run on the synthetic atlas (3 lineages x
3 types x 3 subtypes, 2,000 genes, 10k cells, 8 donors) uses every level, the top level
separates the lineages and level 0 the cell types and the subtypes.
"""

import pytest
import torch

from hvae import HVAEConfig
from pipeline.config import TrainConfig
from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec
from pipeline.evaluate import evaluate_levels
from pipeline.train import batch_codes, fit_in_memory

STEPS = 3_000
LABELS = ["lineage", "cell_type", "subtype"]


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    spec = SyntheticAtlasSpec(n_cells=10_000, n_genes=2_000, n_donors=8, seed=0)
    adata = SyntheticAtlas(spec).to_anndata()
    donors, names = batch_codes(adata.obs, "donor_id")
    config = HVAEConfig(n_genes=spec.n_genes, latent_dims=(32, 16, 8), n_batches=len(names))
    train = TrainConfig(max_steps=STEPS, batch_size=256, kl_warmup_steps=STEPS // 3, seed=0, log_every=100)
    result = fit_in_memory(adata.X, config, train, donors)
    return result, evaluate_levels(result.level_means, adata.obs, LABELS)


@pytest.mark.slow
def test_every_level_is_used(trained):
    result, _ = trained
    assert all(kl > 0.5 for kl in result.kl_per_level), result.kl_per_level
    assert all(units >= 2 for units in result.active_units), result.active_units


@pytest.mark.slow
def test_top_level_carries_lineage_and_level0_the_finer_types(trained):
    _, knn = trained
    top, bottom = knn[-1], knn[0]
    assert top["lineage"] >= 0.9, knn
    assert bottom["cell_type"] >= 0.9, knn
    assert bottom["subtype"] >= 0.8, knn  # chance is 1/27


@pytest.mark.slow
def test_training_loss_falls(trained):
    result, _ = trained
    first, last = result.history[0], result.history[-1]  # steps 100 and 3,000
    assert last["negative_elbo"] < 0.95 * first["negative_elbo"], (first, last)
