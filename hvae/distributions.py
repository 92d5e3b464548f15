"""Plain functions for the likelihoods and KL terms, tested directly against scipy.

All of them compute in float32 (or the input's wider dtype) even under autocast: log-gamma
and log-ratios of counts lose too much in bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Smoothly limit ``x`` to (-bound, bound): ``bound * tanh(x / bound)`` (NVAE)."""
    return bound * torch.tanh(x / bound)


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.dtype == torch.float64 else t.float() for t in tensors]


def nb_log_prob(counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative binomial log-probability, parameterised by mean and inverse dispersion.

    Args:
        counts: (cells, genes) non-negative counts.
        mean: (cells, genes) NB mean ``mu > 0``.
        theta: (genes,) or (cells, genes) inverse dispersion ``theta > 0``
            (variance ``mu + mu**2 / theta``). Same law as
            ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``.

    Returns:
        (cells, genes) element-wise log-probabilities.
    """
    with torch.autocast(device_type=counts.device.type, enabled=False):
        counts, mean, theta = _fp32(counts, mean, theta)
        log_theta_mu = torch.log(theta + mean + _EPS)
        return (
            theta * (torch.log(theta + _EPS) - log_theta_mu)
            + counts * (torch.log(mean + _EPS) - log_theta_mu)
            + torch.lgamma(counts + theta)
            - torch.lgamma(theta)
            - torch.lgamma(counts + 1.0)
        )


def zinb_log_prob(
    counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, zero_logits: torch.Tensor
) -> torch.Tensor:
    """Zero-inflated NB log-probability.

    ``zero_logits`` are the logits of the extra-zero probability ``pi``:
    ``p(0) = pi + (1 - pi) NB(0)`` and ``p(x>0) = (1 - pi) NB(x)``. Shapes as
    :func:`nb_log_prob`, ``zero_logits`` (cells, genes).
    """
    with torch.autocast(device_type=counts.device.type, enabled=False):
        counts, mean, theta, zero_logits = _fp32(counts, mean, theta, zero_logits)
        nb = nb_log_prob(counts, mean, theta)
        log_not_pi = -F.softplus(zero_logits)  # log(1 - pi)
        log_pi = -F.softplus(-zero_logits)  # log(pi)
        zero_case = torch.logaddexp(log_pi, log_not_pi + nb)
        return torch.where(counts < 0.5, zero_case, log_not_pi + nb)


def gaussian_kl(
    mean_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mean_p: torch.Tensor | None = None,
    logvar_p: torch.Tensor | None = None,
    per_dimension: bool = False,
) -> torch.Tensor:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))), summed over the last axis.

    A missing prior is the standard normal. Inputs (cells, dim); returns (cells,), or
    (cells, dim) with ``per_dimension=True``.
    """
    with torch.autocast(device_type=mean_q.device.type, enabled=False):
        mean_q, logvar_q = _fp32(mean_q, logvar_q)
        if mean_p is None:
            mean_p = torch.zeros_like(mean_q)
        if logvar_p is None:
            logvar_p = torch.zeros_like(logvar_q)
        mean_p, logvar_p = _fp32(mean_p, logvar_p)
        kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mean_q - mean_p) ** 2) * torch.exp(-logvar_p) - 1.0)
        return kl if per_dimension else kl.sum(dim=-1)
