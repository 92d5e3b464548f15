"""The Ray-free training core: skip-on-non-finite, precisions, EMA, state round-trip."""

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules
from pipeline.train.in_memory import diagnostic_kl
from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec
from pipeline.config import TrainConfig
from pipeline.data import densify
from pipeline.train.step import Trainer, in_memory_batches


@pytest.fixture(scope="module")
def atlas():
    return SyntheticAtlas(SyntheticAtlasSpec(n_cells=2_048, n_genes=200, n_donors=4)).to_anndata()


def make_trainer(n_genes=200, precision="fp32", seed=0, **model):
    torch.manual_seed(seed)
    config = HVAEConfig(n_genes=n_genes, latent_dims=(16, 8, 4), hidden_dim=64, n_batches=4, **model)
    config = fit_gene_modules(
        config, torch.poisson(torch.rand(256, n_genes, generator=torch.Generator().manual_seed(9)) * 4)
    )
    return Trainer(HierarchicalVAE(config), TrainConfig(precision=precision, kl_warmup_steps=50))


def batch_of(atlas, rows):
    return {
        "counts": atlas.X[rows],
        "batch_index": torch.from_numpy(atlas.obs["donor_id"].cat.codes.to_numpy()[rows].astype(np.int64)),
    }


def test_densify_accepts_scipy_csr_batches_and_dense():
    from pipeline.data import CSRBatch

    matrix = sp.random(5, 7, density=0.3, format="csr", dtype=np.float32, random_state=0)
    expected = torch.from_numpy(matrix.toarray())
    assert torch.equal(densify(matrix, "cpu"), expected)
    assert torch.equal(densify(CSRBatch.from_scipy(matrix), "cpu"), expected)
    assert torch.equal(densify(expected, "cpu"), expected)


def test_bad_counts_are_refused_on_the_cpu_before_the_copy(atlas):
    trainer = make_trainer()
    batch = batch_of(atlas, np.arange(64))
    counts = batch["counts"].toarray()
    counts[7, 11] = 2.5
    with pytest.raises(ValueError, match=r"counts\[7, 11\] = 2.5 is not an integer"):
        trainer.step({**batch, "counts": sp.csr_matrix(counts)})
    batch["batch_index"][3] = 9
    with pytest.raises(ValueError, match=r"batch_index\[3\] = 9 is out of range"):
        trainer.step(batch)
    assert trainer.step_count == 0


def test_non_finite_step_is_skipped_and_changes_nothing(atlas):
    trainer = make_trainer()
    trainer.step(batch_of(atlas, np.arange(64)))
    before = copy.deepcopy(trainer.state_dict())
    poisoned = batch_of(atlas, np.arange(64, 128))
    counts = poisoned["counts"].toarray()
    counts[3, 5] = 3e38  # a finite integer whose library size overflows fp32 -> non-finite loss
    poisoned["counts"] = sp.csr_matrix(counts)
    trainer.step(poisoned)  # decided on the device: the step is taken, the update is not applied
    assert trainer.skipped_steps == 1 and trainer.step_count == 2
    after = trainer.state_dict()
    for key in ("model", "ema"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key}.{name} changed on a skipped step"
    for name, value in before["optimizer"]["state"].items():  # Adam's moments and step count too
        for field, tensor in value.items():
            assert torch.equal(tensor, after["optimizer"]["state"][name][field]), f"optimizer {name}.{field} changed"
    trainer.step(batch_of(atlas, np.arange(128, 192)))
    metrics = trainer.read_metrics()
    assert metrics["step"] == 3 and metrics["applied_steps"] == 2 and metrics["skipped_steps"] == 1
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_and_stay_finite(atlas, precision):
    trainer = make_trainer(precision=precision)
    batches = in_memory_batches(atlas.X, 128, atlas.obs["donor_id"].cat.codes.to_numpy(), seed=0)
    history = trainer.fit(batches, max_steps=20, log_every=5)
    assert trainer.step_count == 20
    assert all(np.isfinite(h["loss"]) for h in history)


def test_state_dict_round_trip_continues_identically(atlas):
    trainer = make_trainer()
    for start in range(0, 320, 64):
        trainer.step(batch_of(atlas, np.arange(start, start + 64)))
    resumed = make_trainer(seed=123)  # different initial weights, overwritten by the state
    resumed.load_state_dict(copy.deepcopy(trainer.state_dict()))
    assert resumed.step_count == trainer.step_count == 5
    batch = batch_of(atlas, np.arange(400, 464))
    trainer.read_metrics(), resumed.read_metrics()
    torch.manual_seed(7)
    trainer.step(batch)
    torch.manual_seed(7)
    resumed.step(batch)
    assert resumed.read_metrics() == pytest.approx(trainer.read_metrics())
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_bf16_trains_as_well_as_fp32(atlas):
    """Same seed, same batches: the EMA models' negative ELBO in fp32 agrees within 3%."""
    donors = atlas.obs["donor_id"].cat.codes.to_numpy()
    final = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(precision=precision)
        trainer.fit(in_memory_batches(atlas.X, 128, donors, seed=0), max_steps=300)
        model = trainer.ema_model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(densify(atlas.X, "cpu"), torch.from_numpy(donors.astype(np.int64)))
        final[precision] = float(out.negative_elbo)
        assert min(diagnostic_kl(model, atlas.X, donors)) > 0.0
    assert abs(final["bf16"] - final["fp32"]) / final["fp32"] < 0.03, final


@pytest.mark.slow
def test_a_compiled_model_trains(atlas):
    """train.compile: torch.compile of the model's forward and loss (inductor, on the CPU here)."""
    torch.manual_seed(0)
    config = fit_gene_modules(HVAEConfig(n_genes=200, latent_dims=(8, 4), hidden_dim=32, n_batches=4), atlas.X[:512])
    trainer = Trainer(HierarchicalVAE(config), TrainConfig(kl_warmup_steps=5, compile=True))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batches = in_memory_batches(atlas.X, 64, atlas.obs["donor_id"].cat.codes.to_numpy(), seed=0)
    history = trainer.fit(batches, max_steps=4, log_every=2)
    assert trainer.step_count == 4 and all(np.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_the_kl_warmup_is_the_first_third_of_training_unless_set():
    assert TrainConfig(max_steps=3000).warmup_steps == 1000
    assert TrainConfig(max_steps=8000).warmup_steps == 2666
    assert TrainConfig(max_steps=8000, kl_warmup_steps=500).warmup_steps == 500
