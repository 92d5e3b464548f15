"""GPU tier: the same model on CUDA in bf16 (skipped without a CUDA device)."""

import numpy as np
import pytest
import torch

from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules
from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec
from pipeline.config import TrainConfig
from pipeline.data import densify
from pipeline.train.step import Trainer, in_memory_batches

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def atlas():
    return SyntheticAtlas(SyntheticAtlasSpec(n_cells=4_096, n_genes=500, n_donors=4)).to_anndata()


def test_bf16_training_on_cuda_matches_cpu_encoding(atlas):
    donors = atlas.obs["donor_id"].cat.codes.to_numpy()
    torch.manual_seed(0)
    config = fit_gene_modules(HVAEConfig(n_genes=500, latent_dims=(16, 8, 4), hidden_dim=128, n_batches=4), atlas.X)
    trainer = Trainer(HierarchicalVAE(config), TrainConfig(precision="bf16", kl_warmup_steps=50), device="cuda")
    history = trainer.fit(in_memory_batches(atlas.X, 512, donors), max_steps=100, log_every=10)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["negative_elbo"] < history[0]["negative_elbo"]
    model = trainer.ema_model
    counts = densify(atlas.X[:256], "cuda")
    on_gpu = model.encode(counts)
    on_cpu = model.to("cpu").encode(counts.cpu())
    for gpu_level, cpu_level in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(gpu_level.cpu(), cpu_level, rtol=1e-3, atol=1e-3)
