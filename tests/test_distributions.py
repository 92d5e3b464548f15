"""Likelihoods and KL against independent references (scipy, Monte Carlo)."""

import numpy as np
import pytest
import scipy.stats
import torch

from hvae import gaussian_kl, nb_log_prob, soft_clamp, zinb_log_prob


@pytest.fixture
def nb_inputs():
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2.0, 0.3, size=(64, 50)).astype(np.float64)
    counts[:, :5] = 0  # plenty of exact zeros
    counts[0, 0] = 4_000  # one very large count
    mean = rng.gamma(1.0, 5.0, size=(64, 50)) + 1e-3
    theta = rng.gamma(2.0, 2.0, size=50) + 0.05
    return counts, mean, theta


def test_nb_log_prob_matches_scipy(nb_inputs):
    counts, mean, theta = nb_inputs
    expected = scipy.stats.nbinom.logpmf(counts, theta, theta / (theta + mean))
    got = nb_log_prob(torch.tensor(counts), torch.tensor(mean), torch.tensor(theta)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_nb_log_prob_is_fp32_under_autocast(nb_inputs):
    counts, mean, theta = (torch.tensor(a, dtype=torch.float32) for a in nb_inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nb_log_prob(counts.bfloat16(), mean.bfloat16(), theta)
    assert got.dtype == torch.float32
    reference = nb_log_prob(counts.double(), mean.bfloat16().double(), theta.double())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-3)


def test_zinb_log_prob_matches_mixture(nb_inputs):
    counts, mean, theta = nb_inputs
    logits = np.random.default_rng(1).normal(0, 2, size=counts.shape)
    pi = 1 / (1 + np.exp(-logits))
    nb = scipy.stats.nbinom.pmf(counts, theta, theta / (theta + mean))
    expected = np.log(np.where(counts == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    got = zinb_log_prob(
        *(torch.tensor(a) for a in (counts, mean, np.broadcast_to(theta, counts.shape).copy(), logits))
    ).numpy()
    finite = np.isfinite(expected)  # scipy underflows to log(0) for the 4,000 count
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_gaussian_kl_matches_closed_form_standard_normal():
    mean = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.2, -0.7]], dtype=torch.float64)
    expected = 0.5 * (torch.exp(logvar) + mean**2 - 1 - logvar).sum()
    torch.testing.assert_close(gaussian_kl(mean, logvar)[0], expected)


def test_gaussian_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    dim = 4
    mean_q = torch.randn(3, dim, generator=generator, dtype=torch.float64)
    mean_p = torch.randn(3, dim, generator=generator, dtype=torch.float64)
    logvar_q = 0.5 * torch.randn(3, dim, generator=generator, dtype=torch.float64)
    logvar_p = 0.5 * torch.randn(3, dim, generator=generator, dtype=torch.float64)
    q = torch.distributions.Normal(mean_q, torch.exp(0.5 * logvar_q))
    p = torch.distributions.Normal(mean_p, torch.exp(0.5 * logvar_p))
    samples = q.sample((400_000,))
    monte_carlo = (q.log_prob(samples) - p.log_prob(samples)).sum(-1).mean(0)
    analytic = gaussian_kl(mean_q, logvar_q, mean_p, logvar_p)
    torch.testing.assert_close(analytic, monte_carlo, rtol=0.02, atol=0.01)
    assert (analytic >= 0).all()


def test_soft_clamp_is_bounded_and_near_identity_at_zero():
    x = torch.linspace(-12, 12, 1001)
    y = soft_clamp(x, 5.0)
    assert y.abs().max() < 5.0
    torch.testing.assert_close(soft_clamp(torch.tensor([0.01]), 5.0), torch.tensor([0.01]), rtol=1e-4, atol=0)
