"""hvae: a top-down hierarchical VAE for single-cell counts, in pure PyTorch.

from hvae import HVAEConfig, HierarchicalVAE, kl_warmup, active_units

model = HierarchicalVAE(HVAEConfig(n_genes=2000, latent_dims=(32, 16, 8)))
out = model(counts, kl_weight=kl_warmup(step, 2000))   # out.loss, out.kl (per level)
level_means = model.encode(counts)                     # level 0 (finest) first
"""

from .config import HVAEConfig
from .diagnostics import active_units
from .distributions import gaussian_kl, nb_log_prob, soft_clamp, zinb_log_prob
from .model import HierarchicalVAE, HVAEOutput
from .modules import fit_gene_modules
from .schedules import balanced_kl_coefficients, kl_warmup

__all__ = [
    "HVAEConfig",
    "HierarchicalVAE",
    "HVAEOutput",
    "active_units",
    "balanced_kl_coefficients",
    "fit_gene_modules",
    "gaussian_kl",
    "kl_warmup",
    "nb_log_prob",
    "soft_clamp",
    "zinb_log_prob",
]
