"""The model contract: config, shapes, gradients, input errors, rebuild from a checkpoint."""

import re
import subprocess
import sys

import pytest
import torch

from hvae import HVAEConfig, HierarchicalVAE, HVAEOutput, active_units, fit_gene_modules, kl_warmup
from hvae.exports import level_export, readout_basis

N_GENES = 40


def counts_batch(n=16, genes=N_GENES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, genes, generator=generator) * 4, generator=generator)


def build(config: HVAEConfig) -> HierarchicalVAE:
    """The model of ``config``, its gene modules (the defaults' coarse levels) built from a sample."""
    return HierarchicalVAE(fit_gene_modules(config, counts_batch(256, genes=config.n_genes, seed=99)))


# Every level decodes the genes, with the coarse reconstruction: the layout whose exports and
# loss terms the tests below read one by one (the defaults' coarse levels decode gene modules).
PLAIN = dict(module_levels=(), kl_capacity=(), coarse_reconstruction_weight=1.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build(HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, n_batches=3, **PLAIN))


def test_forward_returns_typed_output_with_kl_per_level(model):
    x, b = counts_batch(), torch.tensor([0, 1, 2, 0] * 4)
    out = model(x, b, kl_weight=0.3)
    assert isinstance(out, HVAEOutput)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.reconstruction.shape == (16,)
    assert out.kl.shape == (3,) and (out.kl >= 0).all()
    assert out.coarse_reconstruction.shape == ()
    assert torch.isclose(out.negative_elbo, out.reconstruction.mean() + out.kl.sum())


def test_gradients_reach_every_level(model):
    x, b = counts_batch(), torch.tensor([0, 1, 2, 0] * 4)
    model(x, b, kl_weight=1.0).loss.backward()
    parts = {
        "top posterior": model.top_posterior,
        **{f"prior level {level}": head for level, head in enumerate(model.prior_heads)},
        **{f"posterior level {level}": head for level, head in enumerate(model.posterior_heads)},
        **{f"latent_in level {level}": layer for level, layer in enumerate(model.latent_in)},
        **{f"bottom-up level {level}": block for level, block in enumerate(model.bottom_up)},
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"no gradient reaches {name}"


def test_encode_exports_what_each_level_predicts_through_the_read_out(model):
    x = counts_batch()
    model.eval()
    latents, latent_logvars = model.encode_latents(x, return_logvar=True)
    assert [m.shape for m in latents] == [(16, 8), (16, 6), (16, 4)]
    assert [v.shape for v in latent_logvars] == [(16, 8), (16, 6), (16, 4)]
    means, logvars = model.encode(x, return_logvar=True)
    assert [m.shape for m in means] == [(16, 18)] * 3 and model.config.representation_dims == (18, 18, 18)
    assert [v.shape for v in logvars] == [(16, 18)] * 3
    for a, c in zip(means, model.encode(x), strict=True):
        torch.testing.assert_close(a, c)
    # Distances are those of the predicted standardised expression: |e(a) - e(b)| = |W (z_a - z_b)|.
    weight = model.readout.head.weight.detach()
    code = torch.cat(latents, dim=-1)
    torch.testing.assert_close(
        torch.cdist(means[0], means[0]), torch.cdist(code @ weight.T, code @ weight.T), rtol=1e-4, atol=1e-4
    )
    # Level l reads z_l..z_top alone: the levels below enter at their prior means given them.
    for level in (1, 2):
        changed = [z.clone() for z in latents]
        for below in range(level):
            changed[below] += 5.0
        torch.testing.assert_close(level_export(model, level, changed, readout_basis(model)), means[level])
        assert not torch.allclose(level_export(model, 0, changed, readout_basis(model)), means[0])
    # logvar: the posterior's variance carried through the export to first order (central differences).
    eps = 1e-2
    for level in range(3):
        variance = torch.zeros(16, 18)
        for above in range(level, 3):
            for unit in range(latents[above].shape[1]):
                step = eps * torch.exp(0.5 * latent_logvars[above][:, unit])
                up, down = [z.clone() for z in latents], [z.clone() for z in latents]
                up[above][:, unit] += step
                down[above][:, unit] -= step
                basis = readout_basis(model)
                variance += (
                    (level_export(model, level, up, basis) - level_export(model, level, down, basis)) / (2 * eps)
                ) ** 2
        torch.testing.assert_close(logvars[level], torch.log(variance), rtol=1e-3, atol=1e-3)
    # Encoding is deterministic and independent of the other cells in the batch.
    torch.testing.assert_close(model.encode(x[:4])[0], means[0][:4], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        model.encode(x, torch.zeros(16, dtype=torch.long))  # the encoder reads no batch index
    # The basis is computed once per set of weights, and again after they change in place.
    assert readout_basis(model) is readout_basis(model)
    with torch.no_grad():
        model.readout.head.weight.mul_(2.0)
    torch.testing.assert_close(model.encode(x)[0], 2.0 * means[0], rtol=1e-4, atol=1e-4)


def test_without_the_read_out_encode_exports_the_code_from_each_level_up():
    torch.manual_seed(0)
    model = build(HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, readout_weight=0.0))
    x = counts_batch()
    latents, latent_logvars = model.encode_latents(x, return_logvar=True)
    means, logvars = model.encode(x, return_logvar=True)
    assert [m.shape for m in means] == [(16, 18), (16, 10), (16, 4)] and model.config.representation_dims == (18, 10, 4)
    for level in range(3):  # level l: its own units first, then the levels above it
        torch.testing.assert_close(means[level], torch.cat(latents[level:], dim=-1))
        torch.testing.assert_close(logvars[level], torch.cat(latent_logvars[level:], dim=-1))


def test_sample_draws_integer_counts(model):
    model.record_statistics(model(counts_batch(), torch.zeros(16, dtype=torch.long)))
    draws = model.sample(10, batch_index=torch.arange(10) % 3, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (10, N_GENES)
    assert (draws >= 0).all() and torch.equal(draws, draws.round())
    flat = build(HVAEConfig(n_genes=N_GENES, latent_dims=(4,), hidden_dim=16))
    with pytest.raises(ValueError, match="library_size"):
        flat.sample(3)
    assert flat.sample(3, library_size=100.0).shape == (3, N_GENES)


def test_flat_configuration_is_the_same_model_with_one_level():
    model = build(HVAEConfig(n_genes=N_GENES, latent_dims=(10,), hidden_dim=16))
    out = model(counts_batch())
    assert out.kl.shape == (1,) and float(out.coarse_reconstruction) == 0.0
    assert [m.shape for m in model.encode(counts_batch())] == [(16, 10)]


def test_zinb_and_gene_batch_dispersion_run():
    model = build(HVAEConfig(n_genes=N_GENES, hidden_dim=16, n_batches=2, likelihood="zinb", dispersion="gene-batch"))
    out = model(counts_batch(), torch.tensor([0, 1] * 8))
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"n_genes": 0}, "n_genes"),
        ({"latent_dims": ()}, "latent_dims"),
        ({"latent_dims": (8, 0)}, "latent_dims"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"dispersion": "gene-batch"}, "dispersion"),
        ({"free_bits_per_dimension": -0.1}, "free_bits_per_dimension"),
        ({"top_kl_weight": 0.0}, "top_kl_weight"),
        ({"molecule_thinning": 1.0}, "molecule_thinning"),
        ({"molecule_thinning": -0.1}, "molecule_thinning"),
        ({"readout_weight": -0.1}, "readout_weight"),
        ({"dropout": 1.5}, "dropout"),
        ({"hidden_dim": 2.5}, "hidden_dim"),
        ({"unit_prior_levels": (2,)}, "unit_prior_levels"),
        ({"latent_dims": (8,), "unit_prior_levels": (0,)}, "unit_prior_levels"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(values, match):
    with pytest.raises(ValueError, match=f"HVAEConfig.{match}"):
        HVAEConfig(**{"n_genes": 10, **values})


def test_training_thins_what_the_encoder_reads_and_scores_every_molecule():
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 4), hidden_dim=32, molecule_thinning=0.5, **PLAIN)
    model = build(config)
    counts = torch.poisson(torch.rand(512, N_GENES) * 30)
    seen, scored = [], []
    bottom_up, log_likelihood = model._bottom_up, model._log_likelihood
    model._bottom_up = lambda x: seen.append(x) or bottom_up(x)
    model._log_likelihood = lambda x, params: scored.append(x) or log_likelihood(x, params)

    out = model.train()(counts)
    # The encoder reads a binomial thinning of each cell, kept shares spread over U(0.5, 1);
    # both likelihood terms (the full and the coarse reconstruction) score every molecule.
    assert len(seen) == 1 and len(scored) == 2 and all(torch.equal(x, counts) for x in scored)
    thinned = seen[0]
    assert bool((thinned == torch.round(thinned)).all()) and bool((thinned >= 0).all())
    assert bool((thinned <= counts).all())
    share = thinned.sum(dim=1) / counts.sum(dim=1)
    assert 0.45 < float(share.min()) and float(share.max()) <= 1.0
    assert 0.70 < float(share.mean()) < 0.80 and float(share.std()) > 0.1
    torch.testing.assert_close(out.library, counts.sum(dim=1))
    model(counts)  # a fresh draw every step
    assert not torch.equal(seen[1], thinned)

    # Evaluation, encode, and a model with thinning off read every molecule.
    seen.clear()
    model.eval()(counts)
    model.encode(counts)
    model.config = config.replace(molecule_thinning=0.0)
    model.train()(counts)
    assert len(seen) == 3 and all(torch.equal(x, counts) for x in seen)


def test_readout_scores_standardised_log_expression_of_every_molecule():
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 4), hidden_dim=32, n_batches=3, molecule_thinning=0.5, **PLAIN)
    model = build(config).train()
    counts, batches = torch.poisson(torch.rand(64, N_GENES) * 30), torch.arange(64) % 3
    seen = []
    model.readout.register_forward_hook(lambda module, args, out: seen.append(args))
    torch.manual_seed(1)
    out = model(counts, batches)

    # It reads the cells' normalised log expression with every molecule (the encoder's input is
    # thinned), and the code is every level's sample.
    code, expression, batch_index = seen[0]
    library = counts.sum(dim=1)
    torch.testing.assert_close(expression, torch.log1p(counts / library.unsqueeze(1) * config.input_target_sum))
    assert code.shape == (64, 12) and torch.equal(batch_index, batches)
    # It returns the moments it saw; the running ones take them after the step (not in forward:
    # a skipped step changes nothing), and evaluation standardises with those.
    torch.testing.assert_close(out.readout_moments[0], torch.full((N_GENES,), 64.0, dtype=torch.float64))
    torch.testing.assert_close(out.readout_moments[1].float(), expression.sum(dim=0))
    assert not model.readout.moments.any()
    model.record_statistics(out, weight=torch.tensor(0.0))
    assert not model.readout.moments.any()
    model.record_statistics(out)
    torch.testing.assert_close(model.readout.moments, out.readout_moments)
    model.eval()
    seen.clear()
    evaluated = model(counts, batches)
    mean, var = expression.mean(0), expression.var(0, unbiased=False)
    torch.testing.assert_close(
        evaluated.readout,
        0.5
        * ((model.readout.head(seen[0][0]) - ((expression - mean) / torch.sqrt(var + 1e-5)).clamp(-10, 10)) ** 2)
        .sum(dim=1)
        .mean(),
        rtol=1e-4,
        atol=1e-3,
    )
    model.train()
    # Zero-initialised, the prediction is the head alone: the loss is half the squared error
    # between the head and the standardised expression, summed over genes.
    standardised = (expression - expression.mean(0)) / torch.sqrt(expression.var(0, unbiased=False) + 1e-5)
    expected = 0.5 * ((model.readout.head(code) - standardised.clamp(-10, 10)) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(out.readout, expected)

    # The loss is the rest plus readout_weight x the read-out, and the rest is unchanged by it.
    off = build(config.replace(readout_weight=0.0)).train()
    assert off.readout is None
    off.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("readout.")})
    torch.manual_seed(1)
    rest = off(counts, batches)
    assert float(rest.readout) == 0.0
    torch.testing.assert_close(out.loss, rest.loss + out.readout)
    torch.testing.assert_close(out.negative_elbo, rest.negative_elbo)

    # Its gradient reaches the encoder and every part of the read-out, the per-batch gain and
    # shift of the batches present only.
    out.readout.backward()
    assert model.stem[0].weight.grad.abs().sum() > 0
    for name in ("head.weight", "batch_gain.weight", "batch_shift.weight"):
        assert model.readout.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.decoder.parameters())  # the decoder learns from the counts alone
    model.zero_grad()
    model(counts[batches == 0], batches[batches == 0]).readout.backward()
    assert model.readout.batch_shift.weight.grad[1:].abs().sum() == 0
    assert model.readout.batch_shift.weight.grad[0].abs().sum() > 0


def test_config_round_trip_and_unknown_keys():
    config = HVAEConfig(n_genes=100, latent_dims=[16, 8], n_batches=4, top_kl_weight=0.25)
    assert config.latent_dims == (16, 8)
    assert HVAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown key.*latent_dim'"):
        HVAEConfig.from_dict({**config.to_dict(), "latent_dim": [3]})
    with pytest.raises(ValueError, match="unknown key.*bottom_up"):  # an option of format-1 checkpoints, gone
        HVAEConfig.from_dict({**config.to_dict(), "bottom_up": "serial"})


def test_checkpoint_rebuilds_the_same_model(model):
    model.eval()
    x = counts_batch()
    saved = {"model_config": model.config.to_dict(), "state_dict": model.state_dict()}
    rebuilt = HierarchicalVAE(HVAEConfig.from_dict(saved["model_config"]))
    rebuilt.load_state_dict(saved["state_dict"])
    rebuilt.eval()
    for a, c in zip(model.encode(x), rebuilt.encode(x), strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (
            lambda x: x.index_put_((torch.tensor([3]), torch.tensor([7])), torch.tensor(-1.0)),
            r"counts\[3, 7\] = -1.0 is negative",
        ),
        (
            lambda x: x.index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))),
            r"counts\[2, 1\] = nan is NaN",
        ),
        (
            lambda x: x.index_put_((torch.tensor([5]), torch.tensor([0])), torch.tensor(0.5)),
            r"counts\[5, 0\] = 0.5 is not an integer",
        ),
        (lambda x: x[:, :-1], r"39 genes but the model was built for 40"),
        (lambda x: x[0], r"2-D"),
    ],
)
def test_bad_counts_raise_clear_errors(model, corrupt, match):
    x = corrupt(counts_batch())
    with pytest.raises(ValueError, match=match):
        model(x, torch.zeros(16, dtype=torch.long))


def test_bad_batch_index_raises_clear_errors(model):
    x = counts_batch()
    with pytest.raises(ValueError, match=r"batch_index\[4\] = 3 is out of range.*n_batches=3"):
        model(x, torch.tensor([0, 1, 2, 0, 3] + [0] * 11))
    with pytest.raises(ValueError, match="pass batch_index"):
        model(x)
    with pytest.raises(ValueError, match="must hold integers"):
        model(x, torch.zeros(16))
    no_batches = build(HVAEConfig(n_genes=N_GENES, hidden_dim=16))
    with pytest.raises(ValueError, match="n_batches=0"):
        no_batches(x, torch.zeros(16, dtype=torch.long))


def test_kl_warmup_schedule():
    assert kl_warmup(0, 100) == 0.0
    assert kl_warmup(50, 100) == 0.5
    assert kl_warmup(100, 100) == 1.0 and kl_warmup(10_000, 100) == 1.0
    assert kl_warmup(0, 0) == 1.0
    assert kl_warmup(0, 10, start=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        kl_warmup(1, -1)


def test_active_units_counts_dimensions_with_variance():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(500, 4, generator=generator) * torch.tensor([1.0, 0.5, 0.01, 0.0])
    assert active_units([means]) == [2]


def test_hvae_imports_no_pipeline_dependencies():
    code = (
        "import sys, hvae; banned = {'ray', 'zarr', 'tiledbsoma', 'cellxgene_census', 'yaml', 'anndata', 'pipeline'};"
        "print(sorted(banned & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_defaults_give_the_coarse_levels_gene_modules_and_ceilings_by_depth():
    """Left to the depth: the top 24 modules on 10 components, twice both below it, none at level 0
    (a 2-level top, the one coarse level: 12 on 5); ceilings of 2 nats at the top, one more per
    level down; a flat model has neither, and a copy of another depth follows it. A default model
    is built from the data, trains and exports."""
    three, two = HVAEConfig(n_genes=N_GENES), HVAEConfig(n_genes=N_GENES, latent_dims=(8, 4))
    assert three.module_levels == ((24, 10), (48, 20)) and three.kl_capacity == (0, 3, 2)
    assert two.module_levels == ((12, 5),) and two.kl_capacity == (0, 2)
    flat = three.replace(latent_dims=(56,))
    assert flat.module_levels == () and flat.kl_capacity == () and flat.kl_weights_per_level() == (1.0,)
    assert three.coarse_reconstruction_weight == 0
    assert HVAEConfig(n_genes=N_GENES, module_levels=()).replace(latent_dims=(8,)).module_levels == ()
    assert HVAEConfig(n_genes=N_GENES, gene_modules=[0, 1] * 20).module_levels == ()  # given partitions: none to build
    model = build(HVAEConfig(n_genes=N_GENES, hidden_dim=32, n_batches=2))
    assert len(model.config.gene_modules) == 2 and model.config.direct_dims == (32,)
    x, b = counts_batch(64), torch.arange(64) % 2
    model.train()(x, b).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("top_posterior"))
    assert [m.shape for m in model.eval().encode(x)] == [(64, 32)] * 3  # in the read-out's coordinates: level 0's width
    assert HVAEConfig.from_dict(model.config.to_dict()) == model.config


def test_default_kl_weights_halve_the_top_of_a_hierarchy_only():
    deep, flat = HVAEConfig(n_genes=10, latent_dims=(8, 6, 4)), HVAEConfig(n_genes=10, latent_dims=(8,))
    assert deep.kl_weights_per_level() == (1.0, 1.0, 0.5)
    assert flat.kl_weights_per_level() == (1.0,)  # the flat baseline stays a plain VAE
    assert deep.replace(top_kl_weight=1.0).kl_weights_per_level() == (1.0, 1.0, 1.0)
    assert HVAEConfig.from_dict(deep.to_dict()) == deep
    torch.testing.assert_close(build(deep).kl_level_weights, torch.tensor([1.0, 1.0, 0.5]))


def test_kl_balancing_penalises_levels_by_kl_per_dimension():
    from hvae import balanced_kl_coefficients

    kl = torch.tensor([2.0, 2.0, 2.0])
    sizes = torch.tensor([32.0, 16.0, 8.0])
    coefficients = balanced_kl_coefficients(kl, sizes)
    assert torch.isclose(coefficients.mean(), torch.tensor(1.0))
    # Equal KL spread over more dimensions is cheaper: level 0 gets the smallest coefficient.
    assert coefficients[0] < coefficients[1] < coefficients[2]
    torch.testing.assert_close(coefficients[2] / coefficients[0], torch.tensor(4.0))


def test_every_level_is_one_block_from_the_data():
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32)
    model = build(config).eval()
    x = counts_batch()
    states, library = model._bottom_up(x.float()), x.float().sum(dim=1)
    stem = model.stem(torch.log1p(x.float() * (config.input_target_sum / library.clamp(min=1.0)).unsqueeze(1)))
    for block, state in zip(model.bottom_up, states, strict=True):
        torch.testing.assert_close(state, block(stem))
    out = model.train()(x, kl_weight=1.0)
    out.loss.backward()
    assert all(float(b.fc1.weight.grad.abs().sum()) > 0 for b in model.bottom_up)


def test_free_bits_per_dimension_leave_units_below_the_floor_unpenalised():
    torch.manual_seed(0)
    config = HVAEConfig(
        n_genes=N_GENES,
        latent_dims=(8, 4),
        hidden_dim=16,
        free_bits_per_dimension=0.5,
        coarse_reconstruction_weight=0.0,
        kl_balance=False,
        top_kl_weight=1.0,
    )
    model = build(config)
    # (cells, dim) KL per level: two cells whose per-unit means are the values below
    means = [torch.tensor([0.1, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 0.2, 0.0, 0.0])]
    per_dimension = [torch.stack([m * 0.5, m * 1.5]) for m in means]
    kl = torch.stack([m.sum() for m in means])
    # level 0: 0.5 (floor) + 2.0 + 6 x 0.5; level 1: 1.0 + 3 x 0.5
    assert torch.isclose(model._weighted_kl(kl, 1.0, per_dimension), torch.tensor(5.5 + 2.5))
    off = build(config.replace(free_bits_per_dimension=0.0))
    assert torch.isclose(off._weighted_kl(kl, 1.0, per_dimension), kl.sum())
    with pytest.raises(ValueError, match="HVAEConfig.free_bits_per_dimension"):
        config.replace(free_bits_per_dimension=-1.0)


def test_kl_capacity_holds_a_level_to_its_nats_by_dual_ascent():
    torch.manual_seed(0)
    config = HVAEConfig(
        n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, kl_capacity=(0, 0, 0.5), capacity_rate=0.1
    )
    model = build(config)
    x = counts_batch()
    out = model(x)
    assert model.capacity_multipliers.tolist() == [0.0, 0.0, 0.0]
    # Above its ceiling the top's multiplier rises by rate x excess; uncapped levels stay at 0.
    fake = HVAEOutput(
        loss=out.loss,
        reconstruction=out.reconstruction,
        kl=torch.tensor([5.0, 5.0, 2.5]),
        coarse_reconstruction=out.coarse_reconstruction,
        readout=out.readout,
        library=out.library,
    )
    model.record_statistics(fake)
    torch.testing.assert_close(model.capacity_multipliers, torch.tensor([0.0, 0.0, 0.2]))
    model.record_statistics(fake, weight=torch.tensor(0.0))  # a skipped step changes nothing
    torch.testing.assert_close(model.capacity_multipliers, torch.tensor([0.0, 0.0, 0.2]))
    # The Lagrangian term adds multiplier x KL of the capped level to the loss, warm-up or not.
    torch.manual_seed(1)
    with_term = model(x, kl_weight=0.0, coarse_level=1).loss
    model.capacity_multipliers.zero_()
    torch.manual_seed(1)
    without = model(x, kl_weight=0.0, coarse_level=1)
    torch.testing.assert_close(with_term - without.loss, 0.2 * without.kl[2])
    # Below its ceiling the multiplier falls back, never under 0.
    model.capacity_multipliers.fill_(0.05)
    fake.kl = torch.tensor([5.0, 5.0, 0.0])
    model.record_statistics(fake)
    assert model.capacity_multipliers.tolist() == [0.0, 0.0, 0.0]
    # A model without ceilings has no multipliers (its state dict is unchanged).
    assert "capacity_multipliers" not in build(config.replace(kl_capacity=())).state_dict()
    with pytest.raises(ValueError, match="kl_capacity"):
        HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), kl_capacity=(1.0, 2.0))


def test_gene_modules_give_the_top_a_coarse_target_and_no_direct_path():
    """With gene modules the top decodes pooled counts alone: the gene decoder and the read-out
    read levels 0..L-2, so the top reaches the genes only through the lower levels' priors."""
    modules = [g % 4 for g in range(N_GENES)]
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, gene_modules=modules)
    model = build(config)
    assert config.representation_dims == (14, 14, 14) and model.decoder.levels_in.in_features == 14
    counts = torch.poisson(torch.rand(16, N_GENES) * 4)
    out = model(counts)
    assert out.coarse_reconstruction > 0  # the pooled counts' NLL (coarse_reconstruction_weight applies to the rest)
    values = [torch.randn(16, d) for d in config.latent_dims]
    library = counts.sum(dim=1)
    first = model._decode(values, library, None)[0]
    values[-1] = values[-1] + 5.0  # another top, the levels below the same
    torch.testing.assert_close(model._decode(values, library, None)[0], first)
    out.loss.backward()
    assert (
        model.module_heads[0].net[0].weight.grad.abs().sum() > 0 and model.top_posterior.out.weight.grad.abs().sum() > 0
    )
    model.eval()
    exports = model.encode(counts)
    assert [e.shape[1] for e in exports] == [14, 14, 14] and not torch.allclose(exports[0], exports[2])
    with pytest.raises(ValueError, match="gene_modules"):
        HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), gene_modules=[0, 1])


def test_gene_modules_are_built_from_the_data_as_module_levels_ask():
    """Three programmes of genes, each switched on in its own third of the cells, a fourth group of
    genes flat: a top asked for 4 modules on 3 components recovers the programmes exactly."""
    from hvae import fit_gene_modules
    from hvae.modules import GeneCovariance

    generator = torch.Generator().manual_seed(0)
    n_cells, programme = 900, torch.arange(N_GENES) // 10  # genes 0-9, 10-19, 20-29: programmes; 30-39 flat
    group = torch.arange(n_cells) % 3
    rate = torch.full((n_cells, N_GENES), 2.0)
    rate[(group[:, None] == programme[None, :])] = 30.0
    counts = torch.poisson(rate, generator=generator)
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, module_levels=[(4, 3), (6, 4)])
    assert config.direct_dims == (8,)  # two coarse levels, before their partitions are built
    with pytest.raises(ValueError, match=r"fit_gene_modules\(config, counts\)"):
        HierarchicalVAE(config)
    fitted = fit_gene_modules(config, counts)
    top = torch.tensor(fitted.gene_modules[0])
    for p in range(4):  # each programme (and the flat genes) is one module of its own
        assert len(set(top[programme == p].tolist())) == 1
    assert len(set(top.tolist())) == 4 and len(set(fitted.gene_modules[1])) == 6
    assert fit_gene_modules(fitted, counts) is fitted  # built once; a config with partitions keeps them
    assert fit_gene_modules(config, counts).gene_modules == fitted.gene_modules  # the same data, the same partitions
    HierarchicalVAE(fitted)(counts[:16])
    assert HVAEConfig.from_dict(fitted.to_dict()) == fitted

    # Accumulated block by block or at once: the same covariance.
    whole, blocks = GeneCovariance(N_GENES), GeneCovariance(N_GENES)
    whole.update(counts)
    for start in range(0, n_cells, 128):
        blocks.update(counts[start : start + 128])
    torch.testing.assert_close(whole.covariance(), blocks.covariance())

    for bad, words in (([(1, 3)], "modules >= 2"), ([(4, 0)], "components >= 1"), ([(4, 3)] * 3, "at most 2 pairs")):
        with pytest.raises(ValueError, match=rf"module_levels: .*{re.escape(words)}"):
            HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), module_levels=bad)
    with pytest.raises(ValueError, match="names 2 coarse levels but gene_modules has 1"):
        HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), module_levels=[(4, 3), (6, 4)], gene_modules=[0] * N_GENES)


def test_gene_modules_of_many_genes_come_from_a_randomized_svd_read_in_blocks(monkeypatch):
    """Above EXACT_GENES no genes x genes matrix is built: the leading components come from a
    randomized SVD of the standardised cells, read a block at a time, and equal the exact ones
    where the spectrum has a gap; planted programmes among 5,000 genes are recovered exactly."""
    from hvae import modules

    generator = torch.Generator().manual_seed(0)
    n_cells, n_genes = 600, 5_000
    programme = torch.full((n_genes,), 3)
    programme[:900] = torch.arange(900) // 300  # genes 0-899: three programmes; the rest flat
    group = torch.arange(n_cells) % 3
    rate = torch.full((n_cells, n_genes), 2.0)
    rate[(group[:, None] == programme[None, :])] = 30.0
    counts = torch.poisson(rate, generator=generator)

    small = counts[:, 200:500]  # the exact eigenvectors where they are cheap
    cov = modules.GeneCovariance(300)
    cov.update(small)
    values, vectors = torch.linalg.eigh(cov.covariance())
    values, vectors = values.flip(0)[:2], vectors.flip(1)[:, :2]
    approx_values, approx_vectors = modules.leading_components(small, 2)
    torch.testing.assert_close(approx_values, values, rtol=1e-3, atol=1e-3)
    assert torch.linalg.svdvals(vectors.T @ approx_vectors).min() > 0.999  # the same subspace

    monkeypatch.setattr(modules, "BLOCK_VALUES", 100 * n_genes)  # 100 cells a block: several blocks
    monkeypatch.setattr(modules.GeneCovariance, "__init__", lambda *a, **k: pytest.fail("built the whole matrix"))
    config = HVAEConfig(n_genes=n_genes, latent_dims=(8, 6, 4), hidden_dim=32, module_levels=[(4, 3), (6, 4)])
    top = torch.tensor(fit_gene_modules(config, counts).gene_modules[0])
    for p in range(4):
        assert len(set(top[programme == p].tolist())) == 1
    assert len(set(top.tolist())) == 4


def test_the_documented_plain_loop_runs_and_holds_the_ceilings():
    """docs/model.md's plain PyTorch loop, run as written: record_statistics moves the ceilings'
    multipliers, the EMA copy is what it returns, gene modules are built from the cells."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    block = (
        text.split("### The trainer's result in a plain PyTorch loop", 1)[1]
        .split("```python\n", 1)[1]
        .split("```", 1)[0]
    )
    namespace: dict = {}
    exec(compile(block, "docs/model.md", "exec"), namespace)
    group = torch.arange(300) % 3  # three kinds of cells, each with its own programme of genes
    counts = torch.poisson(torch.where(group[:, None] == torch.arange(N_GENES)[None] // 14, 30.0, 2.0))
    config = HVAEConfig(
        n_genes=N_GENES,
        latent_dims=(8, 6, 4),
        hidden_dim=32,
        n_batches=2,
        kl_capacity=(0, 0, 0.05),
        module_levels=[(3, 2)],
    )
    ema = namespace["train_plain"](counts, torch.arange(300) % 2, config, steps=30, batch_size=32)
    assert isinstance(ema, HierarchicalVAE) and not ema.training and len(set(ema.config.gene_modules[0])) == 3
    assert ema.capacity_multipliers[2] > 0  # the top's KL went over its 0.5 nats and the multiplier rose
    assert [e.shape for e in ema.encode(counts[:5])] == [(5, 14)] * 3


def test_a_unit_prior_level_keeps_the_conditional_mean_and_unit_variance():
    """``unit_prior_levels=(0,)``: level 0's prior is N(mean from the levels above, I); level 1's
    stays learned; the model trains through it."""
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=N_GENES, latent_dims=(8, 6, 4), hidden_dim=32, unit_prior_levels=(0,), **PLAIN)
    model = build(config)
    top = torch.randn(5, 4)
    walk = model.walk(top)
    assert torch.equal(walk.logvars[0], torch.zeros(5, 8)) and not torch.equal(walk.logvars[1], torch.zeros(5, 6))
    assert walk.values[0].std(dim=0).gt(0).any()  # the mean still moves with the levels above
    out = model(counts_batch(), kl_weight=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.prior_heads[0].parameters())
